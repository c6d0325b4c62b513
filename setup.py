"""rat-plugins: multi-resolution vision models as detectron2 / MMEngine plugins."""
from setuptools import find_packages, setup

setup(
    name="rat-plugins",
    version="0.1.0",
    description="RAT, ViM, MaxViT-RNN and ViT backbones, necks and heads registered into "
    "detectron2 and OpenMMLab (mmseg, mmdet), with the configs and scripts of the experiments.",
    python_requires=">=3.10",
    packages=find_packages(include=["rat_plugins", "rat_plugins.*"]),
    package_data={"rat_plugins.models.ops": ["csrc/*.cpp"]},
    # Frameworks are optional at import time; tools/install.sh installs the pinned stack
    # (requirements/constraints.txt), including mmcv built from source and detectron2.
    install_requires=["torch>=2.1", "numpy", "pillow", "einops", "timm"],
    extras_require={
        "mm": ["mmengine==0.10.7", "mmcv==2.1.0", "mmdet==3.3.0", "mmsegmentation==1.2.2"],
        "rat": [
            "resolution-aware-transformer",
            "spatial-grouping-attention",
            "rotary-spatial-embeddings",
        ],
        "events": ["h5py", "hdf5plugin"],
        "cuda": ["mamba-ssm", "causal-conv1d"],
        "test": ["pytest"],
    },
    entry_points={"console_scripts": ["rat-plugins=rat_plugins.__main__:main"]},
)
