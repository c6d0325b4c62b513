# Roboflow head-detection export at <dataset root>/coco/{train,valid,test} (datasets/README.md).
from detectron2.config import LazyCall as L
from detectron2.data import build_detection_test_loader, build_detection_train_loader, get_detection_dataset_dicts
from detectron2.evaluation import COCOEvaluator

from rat_plugins.detectron2.data import head_detection_mapper, register_custom_coco

register_custom_coco()  # heads_{train,valid,test}; writes the filtered annotation copies

dataloader = dict(
    image_size=640,
    train=L(build_detection_train_loader)(
        dataset=L(get_detection_dataset_dicts)(names="heads_train"),
        mapper=L(head_detection_mapper)(is_train=True, image_size="${...image_size}"),
        total_batch_size=8,
        num_workers=2,
    ),
    test=L(build_detection_test_loader)(  # validation during training, every epoch
        dataset=L(get_detection_dataset_dicts)(names="heads_valid", filter_empty=False),
        mapper=L(head_detection_mapper)(is_train=False, image_size="${...image_size}"),
        num_workers=2,
    ),
    final_test=L(build_detection_test_loader)(
        dataset=L(get_detection_dataset_dicts)(names="heads_test", filter_empty=False),
        mapper=L(head_detection_mapper)(is_train=False, image_size="${...image_size}"),
        num_workers=2,
    ),
    evaluator=L(COCOEvaluator)(dataset_name="heads_valid", output_dir="${...train.output_dir}/eval_valid"),
    final_test_evaluator=L(COCOEvaluator)(dataset_name="heads_test", output_dir="${...train.output_dir}/eval_test"),
)
