"""Command line: `python -m agent VERB ...`. Bad input prints what to do and exits 2."""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from agent.errors import AgentError, ConfigError

if TYPE_CHECKING:
    from agent.config import AgentConfig

TOKENS_ENV = "AVATAR_AUTH_TOKENS"  # API tokens, separated by commas or whitespace
SECRET_ENV = "AVATAR_TICKET_SECRET"  # the session ticket key


def _serve(args: argparse.Namespace) -> int:
    from agent.server import run_server

    return run_server(serve_config(args, os.environ))


def _warm_up(args: argparse.Namespace) -> int:
    from agent.config import load_config
    from agent.server import warm_up

    return warm_up(load_config(args.config).with_overrides(_flag_overrides(args)))


# `serve` flags that set one config field each: argparse dest -> dotted config path.
_SERVE_OVERRIDES = {
    "host": "server.host",
    "port": "server.port",
    "max_sessions": "server.max_sessions",
    "renderer": "renderer.name",
    "avatar_dir": "avatars.cache_dir",
    "log_format": "logging.format",
    "state_url": "server.state_url",
    "chaos": "engine.chaos",
    "sample_dir": "observability.sample_dir",
    "sample_rate": "observability.sample_rate",
    "profile_turns": "observability.profile_chunks",
    "profile_dir": "observability.profile_dir",
}


def serve_config(args: argparse.Namespace, environ: Mapping[str, str]) -> AgentConfig:
    """The config file (or defaults) with the command line and environment on top."""
    from agent.config import load_config

    config = load_config(args.config)
    overrides = _flag_overrides(args)
    overrides.update(_security_overrides(args, environ, config))
    return config.with_overrides(overrides)


def _flag_overrides(args: argparse.Namespace) -> dict[str, object]:
    """The config fields set by the `_SERVE_OVERRIDES` flags given (a verb may have some)."""
    return {path: getattr(args, flag) for flag, path in _SERVE_OVERRIDES.items()
            if getattr(args, flag, None) is not None}


def _security_overrides(args: argparse.Namespace, environ: Mapping[str, str],
                        config: AgentConfig) -> dict[str, object]:
    out: dict[str, object] = {}
    tokens = [*args.auth_token, *re.split(r"[\s,]+", environ.get(TOKENS_ENV, "").strip())]
    tokens = [t for t in tokens if t]
    if tokens:
        out["auth.tokens"] = (*config.auth.tokens, *tokens)
    if args.auth_token_file is not None:
        out["auth.token_file"] = str(args.auth_token_file)
    if args.ticket_secret_file is not None:
        out["auth.ticket_secret_file"] = str(args.ticket_secret_file)
        out["auth.ticket_secret"] = None
    elif environ.get(SECRET_ENV) and config.auth.ticket_secret_file is None:
        out["auth.ticket_secret"] = environ[SECRET_ENV]
    if args.allowed_origin:
        out["server.allowed_origins"] = (*config.server.allowed_origins, *args.allowed_origin)
    if args.tls_cert is not None or args.tls_key is not None:
        out["server.tls_cert"] = None if args.tls_cert is None else str(args.tls_cert)
        out["server.tls_key"] = None if args.tls_key is None else str(args.tls_key)
    if args.trusted_proxy_hops is not None:
        out["server.trusted_proxy_hops"] = args.trusted_proxy_hops
    if args.max_sessions_per_token is not None:
        out["limits.max_sessions_per_token"] = args.max_sessions_per_token
    return out


def _mint_ticket(args: argparse.Namespace) -> int:
    from agent.auth import mint_ticket, read_secret_file

    if args.ticket_secret_file is not None:
        secret = read_secret_file(args.ticket_secret_file)
    elif os.environ.get(SECRET_ENV):
        secret = os.environ[SECRET_ENV].encode()
    else:
        raise ConfigError(f"no key: pass --ticket-secret-file or set {SECRET_ENV}")
    try:
        ticket = mint_ticket(secret, args.sub, args.avatar, now=time.time(), ttl_s=args.ttl)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    print(ticket)
    return 0


def _client(args: argparse.Namespace) -> int:
    from agent.client import run_client

    return run_client(args.url, args.wav, args.out, codec=args.codec, token=args.token,
                      avatar=args.avatar, text=args.text)


def _prepare(args: argparse.Namespace) -> int:
    import time

    from agent.config import load_config
    from media.face import FaceModelUnavailable, make_face_analyzer
    from media.prepare import PrepareError, PrepareOptions, prepare_avatar

    config = load_config(args.config)
    if args.avatar_dir is not None:
        config = config.with_overrides({"avatars.cache_dir": str(args.avatar_dir)})
    root = Path(config.avatars.cache_dir).expanduser()
    try:
        analyzer = make_face_analyzer(args.faces, config.renderer.latentsync.checkpoint_dir)
    except FaceModelUnavailable as exc:
        raise PrepareError(str(exc)) from None
    options = PrepareOptions(fps=config.avatars.fps, max_height=args.max_height,
                             max_seconds=args.max_seconds)
    t0 = time.perf_counter()
    report = prepare_avatar(root, args.avatar, args.videos, analyzer, options, force=args.force,
                            progress=lambda msg: print(msg, flush=True))
    seconds = time.perf_counter() - t0
    if report.up_to_date:
        print(f"avatar {report.avatar_id!r} in {report.path} is up to date (--force redoes it)")
        return 0
    for c in report.clips:
        print(f"  {c.name}: {c.frames} frames ({c.source_fps:.2f} fps source), "
              f"{c.bad_frames} without a face, {c.rest_segments} rest segments, "
              f"{c.gesture_ends} gesture ends")
    print(f"avatar {report.avatar_id!r} ({report.width}x{report.height}, faces: {report.analyzer})"
          f" written to {report.path} in {seconds:.1f} s ({report.frames / seconds:.1f} frames/s)")
    return 0


def _verify_unet(args: argparse.Namespace) -> int:
    from media.latentsync.verify import verify_unet

    err = verify_unet(args.config, args.weights, args.io)
    print(f"relative_error={err:.3e}")
    return 0


def _verify_audio(args: argparse.Namespace) -> int:
    from media.latentsync.verify_audio import verify_audio

    err = verify_audio(args.checkpoint, args.io)
    print(f"relative_error={err:.3e}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m agent",
        description="Real-time conversational talking-avatar server.",
    )
    verbs = p.add_subparsers(dest="verb", metavar="VERB", required=True)

    s = verbs.add_parser("serve", help="run the session server")
    s.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    s.add_argument("--port", type=int, help="port (default 8765; 0 picks a free one)")
    s.add_argument("--config", type=Path, help="YAML config file (see configs/)")
    s.add_argument("--max-sessions", type=int, help="sessions admitted at once")
    s.add_argument("--renderer", choices=["auto", "cpu", "latentsync"],
                   help="auto: latentsync with checkpoints and CUDA, else cpu")
    s.add_argument("--avatar-dir", type=Path, help="avatar cache folder")
    s.add_argument("--log-format", choices=["json", "console"], help="log line format")
    s.add_argument("--sample-dir", type=Path,
                   help="save a sampled share of turns (input audio, output video) here")
    s.add_argument("--sample-rate", type=float, help="share of turns to sample (0-1)")
    s.add_argument("--profile-turns", type=int, metavar="N",
                   help="write a torch profiler (Perfetto) trace of the first N chunks")
    s.add_argument("--profile-dir", type=Path, help="where profiler traces go (./profiles)")
    s.add_argument("--state-url", help="redis://HOST:PORT/DB: share resumable sessions")
    s.add_argument("--chaos", metavar="SPEC",
                   help="inject faults into the primary renderer, e.g. 'hang=1.0', "
                   "'error=0.2,delay_ms=300', 'oom=0.1,after_s=30,for_s=60' "
                   "(drills and tests; see docs/resilience.md)")
    g = s.add_argument_group("security (docs/security.md)")
    g.add_argument("--auth-token", action="append", default=[], metavar="TOKEN",
                   help="accept this API token (repeatable; visible in `ps`: prefer "
                   f"--auth-token-file or {TOKENS_ENV})")
    g.add_argument("--auth-token-file", type=Path, metavar="FILE",
                   help="accept the API tokens in FILE, one per line")
    g.add_argument("--ticket-secret-file", type=Path, metavar="FILE",
                   help=f"accept session tickets signed with the key in FILE (or {SECRET_ENV})")
    g.add_argument("--allowed-origin", action="append", default=[], metavar="ORIGIN",
                   help="browser Origin allowed to open sessions (repeatable; default any)")
    g.add_argument("--tls-cert", type=Path, metavar="PEM", help="TLS certificate: serve wss://")
    g.add_argument("--tls-key", type=Path, metavar="PEM", help="TLS private key")
    g.add_argument("--trusted-proxy-hops", type=int, metavar="N",
                   help="proxies in front that append X-Forwarded-For (default 0)")
    g.add_argument("--max-sessions-per-token", type=int, metavar="N",
                   help="sessions one API token may hold at once (default: no cap)")
    s.set_defaults(func=_serve)

    w = verbs.add_parser("warm-up", help="load, compile and warm up as serve does, then exit"
                         " (builds the caches a read-only deployment loads)")
    w.add_argument("--config", type=Path, help="YAML config file (the one serve will use)")
    w.add_argument("--renderer", choices=["auto", "cpu", "latentsync"],
                   help="auto: latentsync with checkpoints and CUDA, else cpu")
    w.add_argument("--avatar-dir", type=Path, help="avatar cache folder")
    w.add_argument("--log-format", choices=["json", "console"], help="log line format")
    w.set_defaults(func=_warm_up)

    m = verbs.add_parser("mint-ticket", help="print a short-lived session ticket for a browser")
    m.add_argument("--sub", required=True, help="who the ticket is for (your user id)")
    m.add_argument("--avatar", default="*", help="the avatar it may open (default * = any)")
    m.add_argument("--ttl", type=float, default=300.0, help="seconds it stays valid (300)")
    m.add_argument("--ticket-secret-file", type=Path, metavar="FILE",
                   help=f"the key (default: environment variable {SECRET_ENV})")
    m.set_defaults(func=_mint_ticket)

    c = verbs.add_parser("client", help="speak a WAV file as one turn and save the answer")
    c.add_argument("--url", default="ws://127.0.0.1:8765/v1/session", help="server URL")
    c.add_argument("--wav", type=Path, required=True, help="16-bit PCM WAV to speak")
    c.add_argument("--out", type=Path, help="write the received video and audio to this MP4")
    c.add_argument("--codec", choices=["h264", "jpeg"], default="h264")
    c.add_argument("--avatar", default=None, help="avatar id (default: the server's)")
    c.add_argument("--token", default=None, help="API token or session ticket")
    c.add_argument("--text", default=None, help="transcript sent with speak.start")
    c.set_defaults(func=_client)

    r = verbs.add_parser("prepare", help="make an avatar from videos of one person")
    r.add_argument("--avatar", required=True, help="avatar id (a-z 0-9 _ -)")
    r.add_argument("videos", nargs="+", type=Path, metavar="VIDEO", help="one clip per video")
    r.add_argument("--config", type=Path, help="YAML config file (cache folder, fps)")
    r.add_argument("--avatar-dir", type=Path, help="avatar cache folder (default: serve's)")
    r.add_argument("--faces", choices=["auto", "insightface", "dlib", "haar"], default="auto",
                   help="face landmarks: auto takes the best available")
    r.add_argument("--max-height", type=int, default=720, help="stored frame height at most")
    r.add_argument("--max-seconds", type=float, default=120.0, help="all videos together")
    r.add_argument("--force", action="store_true", help="redo even when up to date")
    r.set_defaults(func=_prepare)

    u = verbs.add_parser("verify-unet", help="check our UNet against reference outputs")
    u.add_argument("--config", type=Path, required=True, help="UNet config JSON")
    u.add_argument("--weights", type=Path, required=True, help=".safetensors or .pt weights")
    u.add_argument("--io", type=Path, required=True, help="safetensors with inputs/expected")
    u.set_defaults(func=_verify_unet)

    a = verbs.add_parser("verify-audio", help="check our audio features against reference")
    a.add_argument("--checkpoint", type=Path, required=True, help="Whisper tiny.pt format")
    a.add_argument("--io", type=Path, required=True, help="safetensors with pcm and features")
    a.set_defaults(func=_verify_audio)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except (AgentError, FileNotFoundError) as exc:
        kind = "config" if isinstance(exc, ConfigError) else "error"
        print(f"{parser.prog} {args.verb}: {kind}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
