"""The studies' machinery: OFAT summary and quick mode, RAT groups and robustness, records, checks.

Importing this package needs neither framework; modules import mmengine / mmseg where they run
configs. The configs live in the source checkout's ``projects/``, found from :data:`REPO`.
"""

from pathlib import Path

__all__ = ["REPO"]

REPO = Path(__file__).resolve().parents[2]
