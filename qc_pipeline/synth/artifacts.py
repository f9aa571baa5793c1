"""Acquisition-artifact simulators: a random parameter draw and a deterministic apply.

Every artifact registered in :data:`ARTIFACTS` has two steps, as TorchIO separates a
random transform's ``get_params()`` from the deterministic transform that takes them:

* the **draw** step ``draw(img, severity, rng, **options) -> params`` makes every random
  choice from ``rng`` (a :class:`numpy.random.Generator` or an int seed) and returns a
  JSON-serialisable dict (plain numbers, lists and strings) of everything the apply step
  needs: ``severity`` and the derived quantities (box corners in world mm, k-space
  positions, ghost count, motion rotations, translations and times, bias coefficients,
  the phase / readout / slice axis chosen, the background fill value, ...);
* the **apply** step ``apply(img, params) -> img`` uses no randomness: the same ``img``
  and ``params`` give the same voxels whatever the state of any random generator.

:func:`draw_artifact_params` and :func:`replay_artifact` run the two steps by artifact
name; :func:`apply_artifact` is ``replay_artifact(img, name, draw_artifact_params(...))``.
The draw step consumes ``rng`` exactly as much as the whole simulation does, so a caller
that reuses one generator for several scans gets the same scans either way.

``img`` is a nibabel image in its native (stored, acquisition) space, ``severity`` in
[0, 1] scales the effect monotonically (0 = no change, except where documented), and at a
fixed rng state a larger severity gives a larger effect. The result is a new float32 image
on the same grid (``wrap_around`` returns a smaller field of view) whose
``extra["artifact"]`` is the params dict the apply step took, so
``replay_artifact(clean, name, out.extra["artifact"])`` reproduces ``out``. Quantities
the draw step derives from the image (head position, background level, axes) are stored
in the params rather than recomputed, so a replay does not depend on how they are
estimated.

Two artifacts need more than numbers: ``kspace_noise`` stores the state of the numpy bit
generator at the draw (``noise_state``) and the apply step regenerates the noise fields
from it (a noise array does not fit in a params dict); ``different_sequence``
regenerates the subject, so its apply step takes ``meta=`` (the dict returned by
:func:`qc_pipeline.synth.make_subject`) besides the params.

Axes: the phase-encode / readout / slice axes are read from the NIfTI ``dim_info`` field
(set by :func:`qc_pipeline.synth.make_subject`); when it is empty the phase axis is the
second stored axis. "Superior" is +z of the image's world (RAS) space.

See ``docs/synth.md`` for every parameter and how severity enters.
"""
from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from .errors import SynthError, UnknownArtifactError
from .paper_artifacts import (apply_box, apply_different_sequence, apply_kspace_noise,
                              apply_periodic_line, apply_ring, draw_chunk_middle, draw_chunk_top,
                              draw_different_sequence, draw_kspace_noise, draw_periodic_line, draw_ring)
from .scanner_artifacts import (apply_bias_field, apply_blur, apply_ghosting, apply_motion, apply_spike,
                                apply_susceptibility, apply_wrap_around, draw_bias_field, draw_blur,
                                draw_ghosting, draw_motion, draw_spike, draw_susceptibility,
                                draw_wrap_around)
from .simulator_base import as_rng, check_3d, check_severity


@dataclass(frozen=True)
class Artifact:
    """A registered artifact: its draw and apply steps and its documentation.

    ``draw(img, severity, rng, **options) -> params`` makes the random choices;
    ``apply(img, params) -> img`` (``apply(img, params, meta=...)`` when ``needs_meta``)
    uses no randomness. ``param_keys`` are the keys of the params the apply step reads
    besides ``severity`` (the draw step may add descriptive ones).
    """

    name: str
    draw: Callable
    apply: Callable
    param_keys: tuple
    description: str
    paper: bool = False       # one of the paper's Table 1 six
    needs_meta: bool = False  # apply needs make_subject's meta (cohort-level)


_BOX_KEYS = ("box_world_lo", "box_world_hi", "fill")

ARTIFACTS = {
    a.name: a
    for a in [
        Artifact("different_sequence", draw_different_sequence, apply_different_sequence,
                 ("other",), "scan of another contrast stored as this one",
                 paper=True, needs_meta=True),
        Artifact("kspace_noise", draw_kspace_noise, apply_kspace_noise, ("sigma", "noise_state"),
                 "Gaussian noise added in k-space", paper=True),
        Artifact("chunk_middle", draw_chunk_middle, apply_box, _BOX_KEYS,
                 "box in the brain set to background", paper=True),
        Artifact("chunk_top", draw_chunk_top, apply_box, _BOX_KEYS,
                 "top of the head/brain set to background", paper=True),
        Artifact("periodic_line", draw_periodic_line, apply_periodic_line,
                 ("axis", "k0", "dk", "n_spikes", "spike_amplitude"),
                 "k-space spike comb: periodic stripes", paper=True),
        Artifact("ring", draw_ring, apply_ring, ("cutoff", "boost"),
                 "Gibbs ringing from hard k-space truncation", paper=True),
        Artifact("motion", draw_motion, apply_motion,
                 ("degrees", "translation", "times", "phase_axis"),
                 "rigid motion between k-space segments (torchio)"),
        Artifact("ghosting", draw_ghosting, apply_ghosting,
                 ("num_ghosts", "intensity", "phase_axis"), "phase-encode ghosts (torchio)"),
        Artifact("spike", draw_spike, apply_spike, ("positions", "intensity"),
                 "herringbone from k-space spikes (torchio)"),
        Artifact("wrap_around", draw_wrap_around, apply_wrap_around,
                 ("phase_axis", "new_n", "old_n", "start", "fill"),
                 "aliasing from a too-small phase FOV"),
        Artifact("susceptibility", draw_susceptibility, apply_susceptibility,
                 ("centre_world", "radius_mm", "max_shift_mm", "readout_axis", "fill"),
                 "metal: void, bright rim, distortion"),
        Artifact("bias_field", draw_bias_field, apply_bias_field, ("coefficients", "order"),
                 "strong intensity inhomogeneity (torchio)"),
        Artifact("blur", draw_blur, apply_blur,
                 ("slice_axis", "thickness_factor", "inplane_sigma_vox"),
                 "thick slices and blurring"),
    ]
}
PAPER_ARTIFACTS = tuple(n for n, a in ARTIFACTS.items() if a.paper)


def _registered(name) -> Artifact:
    if name not in ARTIFACTS:
        raise UnknownArtifactError(
            f"unknown artifact {name!r}; expected one of: {', '.join(ARTIFACTS)}")
    return ARTIFACTS[name]


def draw_artifact_params(img, name: str, severity: float, rng=None, **options) -> dict:
    """Draw the random parameters of artifact ``name`` for ``img`` (the draw step).

    Parameters
    ----------
    img : nibabel image
        3D scan in its stored space.
    name : str
        A key of :data:`ARTIFACTS`.
    severity : float
        In [0, 1].
    rng : numpy.random.Generator or int or None
        Source of every random choice; advanced exactly as :func:`apply_artifact`
        advances it.
    **options
        The artifact's keyword options (its ``draw_<name>`` function's; ``meta=`` for
        ``different_sequence``).

    Returns
    -------
    dict
        JSON-serialisable parameters (``severity`` included) for :func:`replay_artifact`;
        a JSON round trip gives an equal dict.

    Raises
    ------
    UnknownArtifactError
        ``name`` is not registered.
    SynthError
        Severity outside [0, 1], an image that is not 3D, a bad ``rng``, or (for
        ``different_sequence``) no ``meta``.
    TypeError
        An option the artifact's draw step does not take.
    """
    art = _registered(name)
    s = check_severity(severity)
    check_3d(img)
    params = art.draw(img, s, as_rng(rng), **options)
    # normalised through JSON: the dict the apply step takes is then exactly the one a
    # labels TSV (or any JSON store) gives back, so a replay from there is bit-identical
    return json.loads(json.dumps(params))


def _check_params(art: Artifact, params) -> dict:
    if not isinstance(params, Mapping):
        raise SynthError(f"params for {art.name!r} must be a dict (from draw_artifact_params "
                         f"or an image's extra['artifact']); got {type(params).__name__}")
    expected = ("severity",) + tuple(art.param_keys)
    missing = [k for k in expected if k not in params]
    if missing:
        raise SynthError(f"params for {art.name!r} lack {', '.join(map(repr, missing))}; "
                         f"expected keys: {', '.join(expected)}")
    return {**params, "severity": check_severity(params["severity"])}


def replay_artifact(img, name: str, params, *, meta=None):
    """Apply artifact ``name`` with drawn ``params`` (the deterministic apply step).

    Parameters
    ----------
    img : nibabel image
        3D scan in its stored space (the clean scan the params were drawn for).
    name : str
        A key of :data:`ARTIFACTS`.
    params : dict
        From :func:`draw_artifact_params`, an artifact image's ``extra["artifact"]`` or a
        labels TSV's ``artifact_params``.
    meta : dict, optional
        :func:`make_subject`'s dict for ``img``; needed by artifacts with ``needs_meta``
        (``different_sequence``, which regenerates the subject), ignored by the others.

    Returns
    -------
    nibabel.Nifti1Image
        float32 image whose ``extra["artifact"]`` equals ``params``. No random generator
        is read or advanced: the same inputs always give the same voxels.

    Raises
    ------
    UnknownArtifactError
        ``name`` is not registered.
    SynthError
        ``params`` is not a dict, lacks a key the apply step reads (the message names it),
        holds a value of the wrong shape, or ``img`` is not 3D.
    """
    art = _registered(name)
    params = _check_params(art, params)
    check_3d(img)
    if art.needs_meta:
        return art.apply(img, params, meta=meta)
    return art.apply(img, params)


def apply_artifact(img, name: str, severity: float, rng=None, **options):
    """Apply the registered artifact ``name`` at ``severity`` in [0, 1].

    ``replay_artifact(img, name, draw_artifact_params(img, name, severity, rng,
    **options))``: ``rng`` (numpy Generator or int seed) fixes the random choices,
    ``options`` go to the artifact's draw step (``meta=`` for ``different_sequence``,
    which its apply step takes too). The result's ``extra["artifact"]`` holds the params.
    """
    params = draw_artifact_params(img, name, severity, rng, **options)
    return replay_artifact(img, name, params, meta=options.get("meta"))
