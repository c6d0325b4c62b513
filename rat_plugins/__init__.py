"""rat-plugins: multi-resolution vision models for detectron2 and OpenMMLab.

Importing this package has no side effects and needs neither framework. Registration happens
when an adapter is imported:

- ``import rat_plugins.detectron2`` registers into detectron2's registries;
- ``import rat_plugins.mm`` registers into mmseg's and mmdet's registries (what configs load
  through ``custom_imports = dict(imports=['rat_plugins.mm'], allow_failed_imports=False)``).
"""

__version__ = "0.1.0"
