"""MLflow tracking: the shared run handling, quick runs of both tool families into a sqlite store, and a
run logged to a real ``mlflow server`` on 127.0.0.1 (the ``mlflow_server`` fixture starts and stops it)."""

import json
import socket
import sys
import time

import pytest

from _helpers import run_cmd, tiny_ofat_command


def _client(uri):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _only_run(uri, experiment):
    client = _client(uri)
    found = client.get_experiment_by_name(experiment)
    assert found is not None, [e.name for e in client.search_experiments()]
    runs = client.search_runs([found.experiment_id])
    assert len(runs) == 1, [r.info.run_name for r in runs]
    return client, runs[0]


def _artifacts(client, run_id):
    return {a.path for a in client.list_artifacts(run_id)}


def test_run_params_metrics_artifacts_and_resume(tmp_path, monkeypatch):
    from rat_plugins.tracking import MlflowRun

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    work = tmp_path / "sweep" / "run_a"
    work.mkdir(parents=True)
    (work / "final_metrics.json").write_text("{}")
    params = {"train.max_iter": 4, "model.depths": [2, 2], "long": "x" * 2000}
    run = MlflowRun(work, experiment="OFAT").start(params, world_size=2, device="cpu")
    assert run.uri == f"sqlite:///{tmp_path / 'sweep' / 'mlflow.db'}" and run.active and not run.resumed
    for step in range(3):
        run.log_metrics({"total_loss": 1.0 / (step + 1), "not a number": "n/a"}, step=step)
    run.log_artifacts([work / "final_metrics.json", work / "absent.json"])
    run.finish("KILLED")
    again = MlflowRun(work, experiment="OFAT").start(params)
    assert again.resumed and again.run_id == run.run_id
    again.log_metrics({"total_loss": 0.1}, step=3)
    again.finish()

    client, stored = _only_run(run.uri, "OFAT")
    assert stored.info.run_id == run.run_id and stored.info.run_name == "run_a" and stored.info.status == "FINISHED"
    assert stored.data.params["train.max_iter"] == "4" and stored.data.params["model.depths"] == "[2, 2]"
    assert stored.data.params["long"].endswith("...[truncated]") and len(stored.data.params["long"]) == 500
    assert stored.data.tags["world_size"] == "2" and stored.data.tags["host"] == socket.gethostname()
    assert [m.step for m in client.get_metric_history(run.run_id, "total_loss")] == [0, 1, 2, 3]
    assert _artifacts(client, run.run_id) == {"final_metrics.json"}
    assert (tmp_path / "sweep" / "mlartifacts" / "OFAT").is_dir()  # beside the store, not ./mlruns


def test_plain_file_store_is_refused_with_the_fix(tmp_path):
    from rat_plugins.tracking import tracking_uri
    from rat_plugins.utils.config_keys import ConfigError

    with pytest.raises(ConfigError, match=r"plain file store, which MLflow 3 refuses: use a sqlite store"):
        tracking_uri(tmp_path, f"file:{tmp_path}/mlruns")


def test_a_server_that_is_down_warns_once_and_training_goes_on(tmp_path, monkeypatch, caplog):
    from rat_plugins.tracking import MlflowRun

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    started = time.time()
    run = MlflowRun(tmp_path / "run", experiment="OFAT").start({"a": 1})
    run.log_metrics({"loss": 1.0}, step=0)
    run.finish()
    assert not run.active and time.time() - started < 60
    warnings = [r.getMessage() for r in caplog.records if "MLflow tracking" in r.getMessage()]
    assert len(warnings) == 1 and "training goes on without tracking" in warnings[0], warnings


# -- both tool families, end to end -----------------------------------------------------------------
@pytest.mark.slow
def test_detectron2_run_and_its_resume_log_one_mlflow_run(heads_data, tmp_path):
    out = tmp_path / "work_dirs" / "ofat_baseline_lr0.001_bs8_adamw_ep100"
    env = {"RAT_DATASETS": str(heads_data), "RAT_TRACKING": "1", "MLFLOW_TRACKING_URI": ""}
    args = tiny_ofat_command(out)
    run_cmd(args, env=env)
    run_cmd(args[:2] + ["--resume"] + args[2:], env=env)  # finished: the final test again, same MLflow run
    uri = f"sqlite:///{tmp_path / 'work_dirs' / 'mlflow.db'}"
    client, run = _only_run(uri, "OFAT")
    assert json.loads((out / "mlflow_run.json").read_text())["run_id"] == run.info.run_id
    assert run.info.run_name == out.name and run.info.status == "FINISHED"
    assert run.data.params["train.max_iter"] == "4" and run.data.params["optimizer.lr"] == "0.001"
    assert run.data.tags["device"] == "cpu" and "mlflow.source.git.commit" in run.data.tags
    assert [m.step for m in client.get_metric_history(run.info.run_id, "total_loss")] == [0, 1, 2, 3]
    assert client.get_metric_history(run.info.run_id, "lr")
    assert "final/test/bbox/AP50" in run.data.metrics
    assert {"config.yaml", "run_config.json", "metrics.json", "final_metrics.json"} <= _artifacts(
        client, run.info.run_id
    )
    # the OFAT table from the store: the same row as from the work dir
    tables = []
    for source in ([], ["--mlflow"]):
        summary = tmp_path / ("from_mlflow" if source else "from_work_dirs")
        args = [sys.executable, "tools/summarize_ofat.py", "--work-dirs", str(out.parent), "--out", str(summary)]
        run_cmd(args + source, env={"RAT_TRACKING": "1", "MLFLOW_TRACKING_URI": ""})
        row = next(r for r in (summary / "ofat_summary.csv").read_text().splitlines() if r.startswith("baseline_"))
        tables.append(row.split(",")[:7])  # name, status, the five AP columns
    assert tables[0] == tables[1] and tables[0][1] == "finished", tables
    # the table and plots: the artifacts of the OFAT run 'summary' (one, continued by the second summary)
    summary = client.search_runs([run.info.experiment_id], "attributes.run_name = 'summary'")
    assert len(summary) == 1
    names = {a.path for a in client.list_artifacts(summary[0].info.run_id)}
    assert names == {"ofat_summary.md", "ofat_summary.csv", "ofat_loss.png", "ofat_val_map.png"}


@pytest.mark.slow
def test_mmseg_run_and_its_resume_log_one_mlflow_run(fundus_data, tmp_path):
    from test_setr import SMALL, cfg_options

    work = tmp_path / "work_dirs" / "setr"
    env = {"RAT_DATASETS": str(fundus_data), "RAT_TRACKING": "1", "MLFLOW_TRACKING_URI": ""}
    env["RAT_PLUGINS_SCAN_BACKEND"] = "torch"
    args = [sys.executable, "tools/train.py", str(SMALL), "--work-dir", str(work), *cfg_options()]
    run_cmd(args, env=env)
    run_cmd(args + ["--resume"], env=env)
    client, run = _only_run(f"sqlite:///{tmp_path / 'work_dirs' / 'mlflow.db'}", "SETR")
    assert json.loads((work / "mlflow_run.json").read_text())["run_id"] == run.info.run_id
    assert run.info.status == "FINISHED" and run.info.run_name == "setr"
    assert run.data.params["train_cfg.max_iters"] == "4"
    losses = client.get_metric_history(run.info.run_id, "loss")
    assert [m.step for m in losses] == [1, 2, 3, 4]
    assert "mIoU" in run.data.metrics and "final/val/mIoU" in run.data.metrics
    assert {"setr_vit-s16_mla_fundus.py", "run_config.json", "final_metrics.json"} <= _artifacts(
        client, run.info.run_id
    )


@pytest.mark.slow
def test_detectron2_run_logs_to_a_real_tracking_server(mlflow_server, heads_data, tmp_path):
    out = tmp_path / "ofat"
    env = {"RAT_DATASETS": str(heads_data), "RAT_TRACKING": "1", "MLFLOW_TRACKING_URI": mlflow_server}
    run_cmd(tiny_ofat_command(out), env=env)
    client, run = _only_run(mlflow_server, "OFAT")
    assert run.info.status == "FINISHED"
    assert len(client.get_metric_history(run.info.run_id, "total_loss")) == 4
    assert "final_metrics.json" in _artifacts(client, run.info.run_id)  # uploaded through the server
    assert not (tmp_path / "mlflow.db").exists()


@pytest.mark.slow
def test_etram_run_logs_its_experiment_record(events_data, tmp_path):
    from test_rvt_train import PATCH2, _tiny_options

    work = tmp_path / "work_dirs" / "patch2"
    env = {"RAT_DATASETS": str(events_data), "RAT_TRACKING": "1", "MLFLOW_TRACKING_URI": ""}
    run_cmd(
        [sys.executable, "tools/train.py", str(PATCH2), "--work-dir", str(work), "--cfg-options"]
        + _tiny_options((0, 1, 2, 3)),
        env=env,
    )
    client, run = _only_run(f"sqlite:///{tmp_path / 'work_dirs' / 'mlflow.db'}", "eTraM")
    assert run.info.status == "FINISHED" and "final/val/coco/bbox_mAP_s" in run.data.metrics
    record = {a.path for a in client.list_artifacts(run.info.run_id, "record")}
    names = ("hypothesis.md", "modifications.md", "command.md", "code_changes.md")
    assert record == {f"record/{name}" for name in names}
    hypothesis = (work / "record" / "hypothesis.md").read_text()
    assert "Small objects" in hypothesis and "maxvit_yolox_patch4_3scale_baseline.py" in hypothesis
