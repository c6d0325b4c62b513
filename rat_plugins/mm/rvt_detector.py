"""RVT as an mmdet detector over event clips: ``type='RecurrentYOLOX'`` and ``type='EventClipDataPreprocessor'``.

mmdet's ``YOLOX`` (neck, head, SimOTA, losses, inference) whose features come from running the
recurrent backbone over a clip and keeping its last, labelled step, as RVT's random-access
training does (github.com/uzh-rpg/RVT, ``modules/detection.py``).
"""

from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from mmdet.models.detectors import YOLOX
from mmdet.registry import MODELS as MMDET_MODELS
from mmdet.structures import OptSampleList, SampleList
from mmengine.model import BaseDataPreprocessor
from torch import Tensor

from .maxvit_rnn import MaxViTRNN

__all__ = ["EventClipDataPreprocessor", "RecurrentYOLOX"]


@MMDET_MODELS.register_module()
class EventClipDataPreprocessor(BaseDataPreprocessor):
    """Stack event clips ``[T, C, H, W]`` into ``[B, T, C, H, W]`` float, padded bottom / right.

    RVT pads every event tensor with zeros at the bottom and right (``utils/padding.py``,
    ``InputPadderFromShape``, type ``corner``) to ``ceil(side / m) * m`` with ``m`` the backbone's
    padding multiple (the backbone's ``pad_multiple``: RVT's ``32 * partition_split_32`` for every patch
    size by default, the deepest stride times ``partition_split`` with ``partition_rule='deepest_stride'``),
    taking the batch's largest height / width. Boxes need no change: padding adds pixels after the
    image, never before it.

    Counts stay counts: the tensor is only cast to float (RVT feeds raw histogram counts, no mean /
    std), so a uint8 count of 7 is 7.0 afterwards.

    Args:
        pad_size_divisor: ``m`` above. None: :class:`RecurrentYOLOX` sets it to its backbone's
            ``pad_multiple`` when it is built, so the config cannot disagree with the backbone.
        pad_value: value of the padded pixels (0: no events, as RVT).
        non_blocking: copy to the device asynchronously (mmengine option).
    """

    def __init__(self, pad_size_divisor: Optional[int] = None, pad_value: float = 0.0, non_blocking: bool = False):
        super().__init__(non_blocking)
        if pad_size_divisor is not None and int(pad_size_divisor) < 1:
            raise ValueError(f"pad_size_divisor must be a positive integer or None, got {pad_size_divisor}")
        self.pad_size_divisor = None if pad_size_divisor is None else int(pad_size_divisor)
        self.pad_value = pad_value

    def padded_size(self, height: int, width: int) -> Tuple[int, int]:
        """``(ceil(height / m) * m, ceil(width / m) * m)`` (no change while the divisor is unset)."""
        m = self.pad_size_divisor or 1
        return -(-height // m) * m, -(-width // m) * m

    def forward(self, data: dict, training: bool = False) -> dict:
        data = self.cast_data(data)
        clips: List[Tensor] = list(data["inputs"])
        if any(c.ndim != 4 for c in clips):
            raise ValueError(
                "EventClipDataPreprocessor expects clips [T, C, H, W] (PackEventClip output), got "
                f"shapes {[tuple(c.shape) for c in clips]}"
            )
        if len({int(c.shape[1]) for c in clips}) != 1:
            raise ValueError(f"clips of one batch must share C, got {[tuple(c.shape) for c in clips]}")
        samples = data.get("data_samples")
        steps = max(int(c.shape[0]) for c in clips)
        if any(c.shape[0] != steps for c in clips):
            clips = self._front_pad_steps(clips, samples, steps)
        height = max(int(c.shape[-2]) for c in clips)
        width = max(int(c.shape[-1]) for c in clips)
        pad_h, pad_w = self.padded_size(height, width)
        batch = torch.stack(
            [F.pad(c.float(), (0, pad_w - c.shape[-1], 0, pad_h - c.shape[-2]), value=self.pad_value) for c in clips]
        )
        if samples is not None:
            # what mmdet's DetDataPreprocessor records; the head decodes in padded-input pixels
            for sample in samples:
                sample.set_metainfo(dict(batch_input_shape=(pad_h, pad_w), pad_shape=(pad_h, pad_w)))
        return dict(inputs=batch, data_samples=samples)

    @staticmethod
    def _front_pad_steps(clips: List[Tensor], samples: OptSampleList, steps: int) -> List[Tensor]:
        """Clips of different lengths (streamed segments) -> ``steps`` long, zero steps in front that
        the samples' ``valid`` masks mark invalid, so the backbone skips them and keeps each state."""
        if not samples or any("valid" not in s for s in samples):
            raise ValueError(
                f"clips of one batch differ in length ({[int(c.shape[0]) for c in clips]} steps) and have no "
                "valid masks to pad them with: pack them with PackEventClip (its data samples carry 'valid')"
            )
        padded = []
        for clip, sample in zip(clips, samples):
            pad = steps - int(clip.shape[0])
            padded.append(F.pad(clip, (0, 0, 0, 0, 0, 0, pad, 0)))
            update = {}
            for key in ("valid", "is_first", "labelled"):
                if key in sample:
                    mask = torch.as_tensor(sample.get(key), dtype=torch.bool)
                    update[key] = torch.cat([mask.new_zeros(pad), mask])
            sample.set_metainfo(update)
        return padded


@MMDET_MODELS.register_module()
class RecurrentYOLOX(YOLOX):
    """mmdet's ``YOLOX`` whose backbone runs recurrently over event clips ``[B, T, C, H, W]``.

    Feature extraction translates the data samples' ``valid`` / ``is_first`` masks (front padding
    of a short clip, sequence starts) for the backbone's ``forward_clip``
    (:meth:`rat_plugins.models.maxvit_rnn.MaxViTRNN.forward_clip` applies them). The neck and head
    see the backbone maps of the last step, the labelled frame; loss, prediction and ``_forward``
    are otherwise mmdet's.

    Random-access clips start from a zero state. Streamed segments (samples whose metainfo has
    ``stream_end``: ``RVTEventDataset(sampling='streaming')``) carry it, as RVT's streaming
    evaluation does: the model keeps the state each recording (metainfo ``sequence``) ended its last
    segment with and starts the next segment of that recording from it, reset only where
    ``is_first`` marks the recording's start; a recording's state is dropped after its
    ``stream_end`` segment. States are kept detached, so in training gradients stop at a segment's
    start (RVT's truncated backpropagation). Two segments of one recording in one batch run one
    after the other; random-access clips in the same batch (RVT's mixed training,
    ``RVTMixedSampler``) keep their zero state. In evaluation a segment whose predecessor was not
    the last one seen for its recording (segments out of order, e.g. without
    ``sampler=dict(type='RVTStreamingSampler')``) raises an error rather than run from a wrong
    state; in training it starts from a zero state (as after a resume, where RVT loses its states
    too). Inputs without masks (e.g. ``[B, C, H, W]`` images or
    clips without data samples) run as clips whose every step is valid, starting a new sequence at
    step 0.

    Args:
        backbone: the recurrent backbone (``type='MaxViTRNN'``).
        load_from_rvt: a whole RVT detector checkpoint (``rvt-t.ckpt`` ...: backbone, PAFPN and
            YOLOX head) that :meth:`init_weights` loads strictly
            (:func:`~rat_plugins.mm.rvt_checkpoint.load_rvt_detector`; the report is kept in
            ``rvt_checkpoint_report``), e.g. to fine-tune from RVT's weights. mmengine calls
            ``init_weights`` only when training; to evaluate an RVT checkpoint, convert it once with
            ``tools/convert_rvt_checkpoint.py`` and give the result to ``tools/test.py``.
        **kwargs: ``YOLOX`` arguments (neck, bbox_head, train_cfg, test_cfg, data_preprocessor,
            init_cfg). A ``data_preprocessor`` with ``pad_size_divisor=None`` gets the backbone's
            padding multiple.
    """

    def __init__(self, backbone: dict, load_from_rvt: Optional[str] = None, **kwargs):
        super().__init__(backbone=backbone, **kwargs)
        self.load_from_rvt = load_from_rvt or None
        self.rvt_checkpoint_report = None
        # recording -> (objframe_idx of its last segment, detached backbone states after it)
        self._streams: Dict[str, Tuple[int, list]] = {}
        if not isinstance(self.backbone, MaxViTRNN):
            raise TypeError(
                f"RecurrentYOLOX needs a recurrent backbone (type='MaxViTRNN'), got {type(self.backbone).__name__}"
            )
        multiple = self.backbone.pad_multiple
        preprocessor = self.data_preprocessor
        if isinstance(preprocessor, EventClipDataPreprocessor):
            if preprocessor.pad_size_divisor is None:
                preprocessor.pad_size_divisor = multiple
            elif preprocessor.pad_size_divisor % multiple:
                raise ValueError(
                    f"data_preprocessor.pad_size_divisor={preprocessor.pad_size_divisor} is not a "
                    f"multiple of the backbone's padding multiple {multiple}; leave it None"
                )

    def init_weights(self):
        super().init_weights()
        if self.load_from_rvt:
            from .rvt_checkpoint import load_rvt_detector

            self.rvt_checkpoint_report = load_rvt_detector(self, self.load_from_rvt)

    @staticmethod
    def clip_masks(batch_inputs: Tensor, batch_data_samples: OptSampleList = None) -> Tuple[Tensor, Tensor]:
        """``(valid, is_first)``, bool ``[B, T]``, from the data samples (all valid, start at 0 without)."""
        B, T = batch_inputs.shape[:2]
        device = batch_inputs.device
        if not batch_data_samples or "valid" not in batch_data_samples[0]:
            is_first = torch.zeros(B, T, dtype=torch.bool, device=device)
            is_first[:, 0] = True
            return torch.ones(B, T, dtype=torch.bool, device=device), is_first
        valid = torch.stack([torch.as_tensor(s.valid, dtype=torch.bool) for s in batch_data_samples]).to(device)
        is_first = torch.stack([torch.as_tensor(s.is_first, dtype=torch.bool) for s in batch_data_samples]).to(device)
        if valid.shape != (B, T) or is_first.shape != (B, T):
            raise ValueError(
                f"valid / is_first masks must be [B, T] = [{B}, {T}], got {tuple(valid.shape)} and "
                f"{tuple(is_first.shape)}"
            )
        if not valid[:, -1].all():
            raise ValueError("the last step of every clip must be valid: it is the labelled frame")
        return valid, is_first

    def extract_feat(self, batch_inputs: Tensor, batch_data_samples: OptSampleList = None) -> Tuple[Tensor, ...]:
        """Neck output for a clip ``[B, T, C, H, W]`` (or a single step ``[B, C, H, W]``)."""
        if batch_inputs.ndim == 4:
            batch_inputs = batch_inputs[:, None]
        valid, is_first = self.clip_masks(batch_inputs, batch_data_samples)
        if batch_data_samples and any("stream_end" in s for s in batch_data_samples):
            x = self._forward_streams(batch_inputs, valid, is_first, batch_data_samples)
        else:
            x = self.backbone.forward_clip(batch_inputs, valid=valid, is_first=is_first)
        return self.neck(x) if self.with_neck else x

    def reset_streams(self) -> None:
        """Forget every carried state (e.g. before streaming a split again from the middle)."""
        self._streams.clear()

    def _stream_start(self, sample, valid: Tensor, is_first: Tensor) -> Optional[list]:
        """The state a streamed segment starts from (None: a zero state, at the recording's start).

        In training a missing state starts from zero (RVT's states do not survive a resume either:
        the first segments after one run from a zero state); in evaluation it is an error."""
        if "stream_end" not in sample:  # a random-access clip in a mixed batch: its own zero state
            return None
        name, frame = sample.sequence, int(sample.objframe_idx)
        first_valid = int(valid.int().argmax())
        if bool(is_first[first_valid]):
            return None
        carried = self._streams.get(name)
        if carried is not None and carried[0] == frame - 1:
            return carried[1]
        if self.training:
            return None
        seen = "no segment of it yet" if carried is None else f"its last segment ended at labelled frame {carried[0]}"
        raise RuntimeError(
            f"streamed segment of '{name}' ending at labelled frame {frame} arrived but {seen}: a recording's "
            "segments must come in order, each after the one before. Fix: sampler=dict(type='RVTStreamingSampler') "
            "in the data loader, and no dataset subset (dataset_fraction / indices) in streaming mode"
        )

    def _forward_streams(self, inputs: Tensor, valid: Tensor, is_first: Tensor, samples: SampleList):
        """Backbone maps of the last step of each streamed segment, each from its recording's state."""
        waves: List[List[int]] = []  # the k-th segment of a recording in this batch runs in wave k
        count: Dict[str, int] = {}
        for b, sample in enumerate(samples):
            key = sample.sequence if "stream_end" in sample else f"random clip {b}"
            k = count.get(key, 0)
            count[key] = k + 1
            if k == len(waves):
                waves.append([])
            waves[k].append(b)
        outputs: List[Optional[Tuple[Tensor, ...]]] = [None] * len(samples)
        for wave in waves:
            starts = [self._stream_start(samples[b], valid[b], is_first[b]) for b in wave]
            index = torch.tensor(wave, device=inputs.device)
            prev = self._stack_states(starts)
            feats, states = self.backbone.forward_clip(
                inputs[index], valid=valid[index], is_first=is_first[index], prev_states=prev, return_states=True
            )
            for j, b in enumerate(wave):
                sample = samples[b]
                if "stream_end" in sample and sample.stream_end:
                    self._streams.pop(sample.sequence, None)
                elif "stream_end" in sample:
                    state = [(h[j : j + 1].detach(), c[j : j + 1].detach()) for h, c in states]
                    self._streams[sample.sequence] = (int(sample.objframe_idx), state)
                outputs[b] = tuple(f[j] for f in feats)
        return tuple(torch.stack([out[level] for out in outputs]) for level in range(len(outputs[0])))

    @staticmethod
    def _stack_states(starts: List[Optional[list]]) -> Optional[list]:
        """Per-sample carried states -> batch states (zeros for samples that start a recording)."""
        known = next((s for s in starts if s is not None), None)
        if known is None:
            return None
        stacked = []
        for stage, (h, c) in enumerate(known):
            hs, cs = [], []
            for start in starts:
                sh, sc = (torch.zeros_like(h), torch.zeros_like(c)) if start is None else start[stage]
                hs.append(sh)
                cs.append(sc)
            stacked.append((torch.cat(hs), torch.cat(cs)))
        return stacked

    # mmdet's SingleStageDetector bodies, passing the samples (they hold the masks) to extract_feat
    def loss(self, batch_inputs: Tensor, batch_data_samples: SampleList) -> dict:
        return self.bbox_head.loss(self.extract_feat(batch_inputs, batch_data_samples), batch_data_samples)

    def predict(self, batch_inputs: Tensor, batch_data_samples: SampleList, rescale: bool = True) -> SampleList:
        results = self.bbox_head.predict(
            self.extract_feat(batch_inputs, batch_data_samples), batch_data_samples, rescale=rescale
        )
        return self.add_pred_to_datasample(batch_data_samples, results)

    def _forward(self, batch_inputs: Tensor, batch_data_samples: OptSampleList = None):
        return self.bbox_head.forward(self.extract_feat(batch_inputs, batch_data_samples))
