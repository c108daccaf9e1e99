"""The ``sidewatch`` command: serve, model-server, demo, calibrate, alerts status, route undo, baseline reset."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from agent import logs
from agent.config import ConfigError, load_config


def _add_serve(commands) -> None:
    serve = commands.add_parser("serve", help="run the sidecar in front of a model server")
    serve.add_argument("--config", type=Path, help="YAML configuration file")
    serve.add_argument("--listen", help="HOST:PORT for clients (default 0.0.0.0:9000)")
    serve.add_argument("--upstream", help="HOST:PORT of the model server (default 127.0.0.1:8001)")
    serve.add_argument("--metrics-listen", help="HOST:PORT for /metrics (default 0.0.0.0:9102)")
    serve.add_argument("--max-message-bytes", type=int, help="largest message accepted, both ways")
    serve.add_argument("--model-repository", type=Path,
                       help="DIR/<model>/<version>/model.onnx with sidewatch-calibration.json: turns detection on")
    serve.add_argument("--adversarial-mode", choices=["shadow", "flag", "enforce"],
                       help="adversarial detection mode for every model (overrides the config's per-model modes)")
    serve.add_argument("--device", choices=["auto", "cpu", "cuda"], help="where the detectors run (default auto)")
    serve.add_argument("--log-requests", action="store_true", default=None,
                       help="log every call (request id, model, status, duration; never the payload)")
    serve.add_argument("--data-plane", choices=["auto", "python", "envoy"],
                       help="who carries the calls: Envoy, the grpc.aio relay (python), or auto (the default: "
                            "Envoy where its binary is installed)")
    serve.add_argument("--check-config", action="store_true", help="validate the configuration and exit")
    _add_log_options(serve, defaults=False)
    serve.set_defaults(run=_run_serve)


def _run_serve(args) -> int:
    from agent.app import check_config, serve
    from agent.eventloop import run_event_loop

    config = load_config(args.config, {
        "listen": args.listen,
        "upstream.address": args.upstream,
        "metrics.listen": args.metrics_listen,
        "max_message_bytes": args.max_message_bytes,
        "detection.model_repository": str(args.model_repository) if args.model_repository else None,
        "detection.device": args.device,
        "log_requests": args.log_requests,
        "data_plane": args.data_plane,
    }, adversarial_mode_for_every_model=args.adversarial_mode)
    if args.check_config:
        from agent.dataplane.choice import choose

        for warning in check_config(config):
            print(f"sidewatch: warning: {warning}", file=sys.stderr)
        plane, reason = choose(config)
        print(f"sidewatch: the {plane} data plane would carry the calls ({reason})", file=sys.stderr)
        print("sidewatch: configuration is valid")
        return 0
    # The log options again, now with the configuration's bound on a line.
    logs.configure(args.log_level, args.log_format, config.log_max_line_bytes)
    with logs.stray_output_logged():
        run_event_loop(serve(config))
    return 0


def _add_model_server(commands) -> None:
    model_server = commands.add_parser("model-server", help="run the bundled Open Inference Protocol model server")
    model_server.add_argument("--model-repository", type=Path,
                              help="DIR laid out as DIR/<model>/<version>/model.onnx (default: the bundled one)")
    model_server.add_argument("--listen", default="127.0.0.1:8001", help="HOST:PORT (default 127.0.0.1:8001)")
    model_server.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                              help="ONNX Runtime execution provider (auto: CUDA when present)")
    _add_log_options(model_server, defaults=False)
    model_server.set_defaults(run=_run_model_server)


def _run_model_server(args) -> int:
    from agent.modelserver.server import run_model_server

    with logs.stray_output_logged():
        run_model_server(args.model_repository, args.listen, args.device)
    return 0


def _add_demo(commands) -> None:
    demo = commands.add_parser("demo", help="model server + sidecar + a client streaming MNIST, with a live display")
    demo.add_argument("--duration", type=float, default=60.0, help="seconds to run (default 60)")
    demo.add_argument("--rate", type=float, default=50.0, help="requests per second (default 50)")
    demo.set_defaults(run=_run_demo)


def _run_demo(args) -> int:
    from agent.demo.run import run_demo

    return run_demo(duration=args.duration, rate=args.rate)


def _add_calibrate(commands) -> None:
    from agent.detect.calibration.autoencoder_training import TrainingRecipe

    calibrate = commands.add_parser(
        "calibrate", help="set the adversarial detectors' thresholds on benign data and write a calibration artifact",
        description="Train the autoencoder detector on part of the benign reference inputs, score the rest "
                    "with it and with feature squeezing, set both thresholds jointly at the target false-positive "
                    "rate and write a JSON artifact (default: sidewatch-calibration.json beside the model). "
                    "--detectors feature_squeezing calibrates squeezing alone, on all the reference. Reference "
                    "data: .npz (key 'x', or its only array) or .npy; uint8 values are divided by 255, floats taken "
                    "as they are; [N, H, W] gets a channel axis when the model takes [N, 1, H, W].")
    calibrate.add_argument("--model", type=Path, required=True, help="the served model.onnx")
    calibrate.add_argument("--reference", type=Path, required=True, help="benign inputs, DATA.npz or DATA.npy")
    calibrate.add_argument("--squeezers", default="bit_depth:1,median:2",
                           help="comma-separated: bit_depth:BITS, median:SIZE, nl_means:SEARCH-PATCH-H "
                                "(default bit_depth:1,median:2)")
    calibrate.add_argument("--target-fpr", type=float, default=0.05,
                           help="false-positive rate on benign inputs, of all the detectors together (default 0.05)")
    calibrate.add_argument("--detectors", default="feature_squeezing,autoencoder",
                           help="feature_squeezing,autoencoder (the default) or feature_squeezing alone")
    calibrate.add_argument("--autoencoder-error", choices=["l1", "l2"], default="l2",
                           help="the autoencoder detector's score: mean absolute (l1) or squared (l2) reconstruction "
                                "error (default l2)")
    calibrate.add_argument("--autoencoder-epochs", type=int, default=TrainingRecipe.epochs,
                           help=f"passes over its training rows (default {TrainingRecipe.epochs})")
    calibrate.add_argument("--calibration-share", type=float, default=0.4,
                           help="with the autoencoder: the share of the reference that sets the thresholds; the "
                                "autoencoder trains on the rest (default 0.4)")
    calibrate.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                           help="ONNX Runtime execution provider (auto: CUDA when present)")
    calibrate.add_argument("--output-kind", choices=["auto", "probabilities", "logits"], default="auto",
                           help="what the model outputs (auto: probabilities when it ends in a Softmax)")
    calibrate.add_argument("--input-name", help="the image input, when the model has several inputs")
    calibrate.add_argument("--output-name", help="the class-score output, when the model has several outputs")
    calibrate.add_argument("--out", type=Path, help="artifact path (default: sidewatch-calibration.json beside the model)")
    # Gone with the false-alarm budget: refused with a message, not as an unknown flag.
    calibrate.add_argument("--ert", type=float, help=argparse.SUPPRESS)
    calibrate.add_argument("--drift-window", type=int, help=argparse.SUPPRESS)
    calibrate.add_argument("--no-drift", action="store_true", help="calibrate the adversarial detectors only")

    calibrate.set_defaults(run=_run_calibrate)


def _run_calibrate(args) -> int:
    from agent.detect.adversarial.autoencoder import AutoencoderError
    from agent.detect.adversarial.graph import FusedModelError, inspect_model, load_model
    from agent.detect.adversarial.squeeze import SqueezerSpecError, format_squeezers, parse_squeezers
    from agent.detect.calibration import CalibrationError
    from agent.detect.calibration.artifact import default_artifact_path, save_artifact
    from agent.detect.calibration.autoencoder_training import TrainingRecipe
    from agent.detect.calibration.calibrate import calibrate
    from agent.detect.calibration.reference import load_reference

    if args.ert is not None or args.drift_window is not None:
        print("sidewatch: --ert and --drift-window are gone: drift alarms now spend a false-alarm budget in time "
              "(drift.false_alarm_budget in the serve config, default 1/30d), not an expected run time in requests; "
              "calibrate without them", file=sys.stderr)
        return 2
    detectors = [name.strip() for name in args.detectors.split(",") if name.strip()]
    if detectors not in (["feature_squeezing"], ["feature_squeezing", "autoencoder"]):
        print(f"sidewatch: --detectors must be feature_squeezing,autoencoder or feature_squeezing, got "
              f"{args.detectors!r}", file=sys.stderr)
        return 2
    if args.autoencoder_epochs < 1:
        print(f"sidewatch: --autoencoder-epochs must be at least 1, got {args.autoencoder_epochs}", file=sys.stderr)
        return 2
    try:
        model = load_model(args.model)
        info = inspect_model(model, args.input_name, args.output_name, args.output_kind)
        parse_squeezers(args.squeezers)
        x = load_reference(args.reference, info.input_shape)
        recipe = None
        if "autoencoder" in detectors:
            recipe = TrainingRecipe(epochs=args.autoencoder_epochs)
        artifact = calibrate(args.model, x, args.squeezers, args.target_fpr, output_kind=args.output_kind,
                             input_name=args.input_name, output_name=args.output_name, device=args.device,
                             reference_source=Path(args.reference).name,
                             drift=None if args.no_drift else {}, autoencoder=recipe,
                             autoencoder_error=args.autoencoder_error, calibration_share=args.calibration_share)
        out = save_artifact(artifact, args.out or default_artifact_path(args.model))
    except (CalibrationError, FusedModelError, SqueezerSpecError, AutoencoderError, OSError) as err:
        print(err if str(err).startswith("sidewatch:") else f"sidewatch: {err}", file=sys.stderr)
        return 2
    scores = artifact.benign_scores
    print(f"sidewatch: calibrated {args.model} on {scores['count']} reference inputs with "
          f"{format_squeezers(parse_squeezers(artifact.squeezers))}"
          + (f" and an autoencoder trained on {artifact.split['autoencoder_rows']} others" if recipe else "")
          + f": threshold {artifact.threshold:.6g} ({scores['above_threshold']} of {scores['count']} benign scores "
          f"above it; target FPR {artifact.target_fpr:g})")
    if recipe:
        print("sidewatch: detector thresholds (set jointly): " + ", ".join(
            f"{entry['name']} {entry['threshold']:.6g} ({entry['benign_scores']['above_threshold']} above)"
            for entry in artifact.detectors))
    print(f"sidewatch: wrote {out}")
    return 0


def _admin_options(parser) -> None:
    parser.add_argument("--config", type=Path, help="the sidecar's YAML configuration: its admin.listen, admin.tls "
                                                     "and admin.token_file are used unless given below")
    parser.add_argument("--admin-url", help="the admin API (default http://127.0.0.1:9103)")
    parser.add_argument("--token-file", type=Path, help="file holding the admin token (default: SIDEWATCH_ADMIN_TOKEN, "
                                                        "then the config's admin.token_file)")
    parser.add_argument("--ca-file", type=Path, help="CA certificate to verify an https:// admin API with")


def _admin_client(args):
    import os

    from agent.admin.client import DEFAULT_URL, AdminClient, client_token
    from agent.admin.token import TOKEN_ENV
    from agent.config import split_address

    url, token_file = args.admin_url, args.token_file
    if args.config is not None:
        admin = load_config(args.config).admin
        if url is None:
            host, port = split_address(admin.listen)
            host = "127.0.0.1" if host in ("0.0.0.0", "") else "::1" if host == "::" else host
            url = f"{'https' if admin.tls else 'http'}://{f'[{host}]' if ':' in host else host}:{port}"
        if token_file is None and not os.environ.get(TOKEN_ENV):
            token_file = admin.token_file
    return AdminClient(url or DEFAULT_URL, client_token(token_file), args.ca_file)


def _run_admin(action):
    """Run an admin API call; its refusals and connection errors are printed, not raised."""

    def run(args) -> int:
        from agent.admin.client import AdminError

        try:
            return action(_admin_client(args), args)
        except AdminError as err:
            print(err, file=sys.stderr)
            return 1 if err.status == 404 else 2

    return run


def _add_alerts(commands) -> None:
    alerts = commands.add_parser("alerts", help="the sidecar's alerts and rollbacks, through its admin API")
    actions = alerts.add_subparsers(dest="action", required=True)
    status = actions.add_parser("status", help="alert states, incidents, hook results and route pins")
    _admin_options(status)
    status.add_argument("--json", action="store_true", help="print the API's JSON as it is")

    def show(client, args) -> int:
        import json

        from agent.admin.status_text import format_status

        reply = client.status()
        print(json.dumps(reply, indent=1, sort_keys=True) if args.json else format_status(reply))
        return 0

    status.set_defaults(run=_run_admin(show))


def _add_route(commands) -> None:
    route = commands.add_parser("route", help="route pins set by rollback hooks, through the sidecar's admin API")
    actions = route.add_subparsers(dest="action", required=True)
    undo = actions.add_parser("undo", help="remove a model's route pin: its traffic goes where the request says again")
    _admin_options(undo)
    undo.add_argument("--model", required=True, help="the pinned model")
    undo.add_argument("--actor", help="who undoes it, for the audit log (default user@host)")

    def run_undo(client, args) -> int:
        client.undo_route(args.model, args.actor)
        print(f"sidewatch: route pin of {args.model} undone")
        return 0

    undo.set_defaults(run=_run_admin(run_undo))


def _add_baseline(commands) -> None:
    baseline = commands.add_parser("baseline", help="drift baselines, through the sidecar's admin API")
    actions = baseline.add_subparsers(dest="action", required=True)
    reset = actions.add_parser("reset", help="re-baseline a model version after an intended change: a version "
                                             "learned from traffic learns again; a calibrated one restarts its tests")
    _admin_options(reset)
    reset.add_argument("model")
    reset.add_argument("version")
    reset.add_argument("--actor", help="who resets it, for the log (default user@host)")

    def run_reset(client, args) -> int:
        client.reset_baseline(args.model, args.version, args.actor)
        print(f"sidewatch: drift baseline of {args.model} version {args.version} reset")
        return 0

    reset.set_defaults(run=_run_admin(run_reset))


def _add_log_options(parser: argparse.ArgumentParser, defaults: bool) -> None:
    """The log options, before the command or (for the long-running ones) after it."""
    parser.add_argument("--log-level", default="INFO" if defaults else argparse.SUPPRESS,
                        help="DEBUG, INFO, WARNING or ERROR")
    parser.add_argument("--log-format", default="auto" if defaults else argparse.SUPPRESS,
                        choices=["auto", "json", "text"],
                        help="json: one JSON object per line; auto (default): json unless stderr is a terminal")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sidewatch", description=__doc__)
    _add_log_options(parser, defaults=True)
    commands = parser.add_subparsers(dest="command", required=True)
    _add_serve(commands)
    _add_model_server(commands)
    _add_demo(commands)
    _add_calibrate(commands)
    _add_alerts(commands)
    _add_route(commands)
    _add_baseline(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logs.configure(args.log_level, args.log_format)
    try:
        return args.run(args)
    except ConfigError as err:
        print(err, file=sys.stderr)
        return 2
    except (ValueError, OSError) as err:
        # sidewatch's own refusals (a model whose hash does not match its calibration, a missing
        # repository) are worded for the operator; anything else keeps its traceback, in the log.
        if not str(err).startswith("sidewatch:"):
            return _crashed(args)
        print(err, file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception:
        return _crashed(args)


def _crashed(args) -> int:
    """An error nobody expected: logged with its traceback, as one record (a JSON line with a JSON log)."""
    logging.getLogger("agent.cli").critical("sidewatch: %s stopped by an unexpected error", args.command,
                                            exc_info=True)
    return 1


if __name__ == "__main__":
    sys.exit(main())
