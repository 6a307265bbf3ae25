"""The package's errors: what a user gave that cannot be used, each kind named by what was wrong.

Every one is a `TuckerError`, and every command (``nnunet-tucker``, ``nnUNetv2_predict_tucker``) and
the start-up hook inside nnU-Net's and TotalSegmentator's own commands end on one as a single line,
``nnunet-tucker: error: <message>``, exit code 2. The message says which value, file or folder and
what to do instead. Anything else that goes wrong is a bug, and keeps its traceback.

The kinds are also ValueErrors (a wrong value handed to a function), so code that catches
ValueError keeps catching them:

- `TuckerConfigError`: a setting: a flag, a ``TUCKER_*`` variable, a plans.json ``"tucker"`` field
  or a function argument, out of range or in conflict with another, or missing;
- `ModelFolderError`: a model folder that is not one (no plans.json, no fold, an unreadable or foreign
  checkpoint, a compressed folder of another model) or that cannot be written as the output of
  ``compress`` (it holds the source, it exists, it is in the way);
- `InputError`: a folder or file of the user's data: images to predict, reference labels;
- `CalibrationError` (an `InputError`): calibration images or patches that cannot be calibrated on;
- `OutputFolderError`: a folder for results (``evaluate``, ``demo``) that exists or is in the way.

This module imports nothing: every layer may raise these, and the start-up hook may catch them.
"""


class TuckerError(Exception):
    """Something the user gave cannot be used; the message names it and says what to do instead."""


class TuckerConfigError(TuckerError, ValueError):
    """A setting that is not allowed: a flag, ``TUCKER_*`` variable, plans.json field or argument value."""


class ModelFolderError(TuckerError, ValueError):
    """A model folder or checkpoint that cannot be used, or a model folder that cannot be written."""


class InputError(TuckerError, ValueError):
    """A folder or file of the user's data (images, reference labels) that is missing or cannot be used."""


class CalibrationError(InputError):
    """Calibration images or patches that cannot be used; the message names the folder or file and what
    is expected."""


class OutputFolderError(TuckerError, ValueError):
    """A folder to write results to that exists (pass --overwrite), is not empty, or is a file."""
