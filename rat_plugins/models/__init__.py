"""Pure PyTorch model families (no detectron2 / OpenMMLab import here). One file per family."""
