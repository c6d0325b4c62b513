# Roboflow head-detection export at <dataset root>/coco/{train,valid,test} (datasets/README.md).
# The splits register (head_detection_{train,valid,test}) when a loader is built, not at load.
from detectron2.config import LazyCall as L
from detectron2.data import build_detection_test_loader, build_detection_train_loader
from detectron2.evaluation import COCOEvaluator

from rat_plugins.detectron2.data import head_detection_dicts, head_detection_mapper

dataloader = dict(
    image_size=640,
    # the classes to train, in the model's order (None: every class of the export); e.g.
    # dataloader.classes=[head] leaves out the boxes of other classes, with a warning
    classes=None,
    train=L(build_detection_train_loader)(
        dataset=L(head_detection_dicts)(names="head_detection_train", classes="${...classes}"),
        mapper=L(head_detection_mapper)(is_train=True, image_size="${...image_size}"),
        total_batch_size=8,
        num_workers=2,
    ),
    test=L(build_detection_test_loader)(  # validation during training, every epoch
        dataset=L(head_detection_dicts)(names="head_detection_valid", classes="${...classes}", filter_empty=False),
        mapper=L(head_detection_mapper)(is_train=False, image_size="${...image_size}"),
        num_workers=2,
    ),
    final_test=L(build_detection_test_loader)(
        dataset=L(head_detection_dicts)(names="head_detection_test", classes="${...classes}", filter_empty=False),
        mapper=L(head_detection_mapper)(is_train=False, image_size="${...image_size}"),
        num_workers=2,
    ),
    evaluator=L(COCOEvaluator)(dataset_name="head_detection_valid", output_dir="${...train.output_dir}/eval_valid"),
    final_test_evaluator=L(COCOEvaluator)(
        dataset_name="head_detection_test", output_dir="${...train.output_dir}/eval_test"
    ),
)
