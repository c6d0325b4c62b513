"""ISIC 2018 Task 1's folder names per split (``docs/formats.md``, ISIC 2018): one place for the
mmseg dataset, the synthetic generator and the config checks."""

__all__ = ["ISIC_FOLDERS"]

# split -> (input images folder, ground-truth masks folder)
ISIC_FOLDERS = {
    "Training": ("ISIC2018_Task1-2_Training_Input", "ISIC2018_Task1_Training_GroundTruth"),
    "Validation": ("ISIC2018_Task1-2_Validation_Input", "ISIC2018_Task1_Validation_GroundTruth"),
    "Test": ("ISIC2018_Task1-2_Test_Input", "ISIC2018_Task1_Test_GroundTruth"),
}
