"""IterMask3D engine: high-frequency filter, training masks, tau fit, test-time loop,
inference class, model folders and training (pure library code, no Nipype)."""
from .errors import (EngineError, InvalidInputError, ModelCardError, ModelNotFoundError,
                     ShapeMismatchError, VoxelSizeMismatchError)
from .hf import high_frequency, hf_radius
from .masks import noise_fill, random_training_mask
from .taufit import TauFit, fit_tau_curve
from .schedules import SCHEDULES, Schedule, get_schedule
from .modelio import (default_card, default_model_dir, load_model_card, make_random_model_folder,
                      save_model_folder)
from .inference import IterMask3D, Result, resolve_device
from .training import train_model

__all__ = [
    "high_frequency", "hf_radius",
    "random_training_mask", "noise_fill",
    "fit_tau_curve", "TauFit",
    "IterMask3D", "Result", "resolve_device",
    "Schedule", "SCHEDULES", "get_schedule",
    "train_model",
    "save_model_folder", "load_model_card", "make_random_model_folder", "default_model_dir", "default_card",
    "EngineError", "ModelNotFoundError", "ModelCardError", "ShapeMismatchError",
    "VoxelSizeMismatchError", "InvalidInputError",
]
