"""focalserve-client: the focal loss of .npy files, from the command line.

    focalserve-client compute --logit logit.npy --label label.npy [--grad-out grad.npy] [--upstream-grad g.npy]
    focalserve-client stream  --logit a.npy --label b.npy --logit c.npy --label d.npy
    focalserve-client info
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import grpc
import numpy as np

from .client import ComputeResult, FocalLossClient, FocalLossError, StreamSummary


class Progress:
    """A one-line progress bar on stderr (a line per 10% when stderr is not a terminal)."""

    def __init__(self, label: str, unit: str, enabled: bool = True, stream=sys.stderr):
        self.label, self.unit, self.enabled, self.stream = label, unit, enabled, stream
        self.tty = stream.isatty()
        self.started = time.monotonic()
        self._last_draw = 0.0
        self._last_decile = -1

    def update(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        fraction = done / total if total else 1.0
        decile = int(fraction * 10)
        if self.tty and now - self._last_draw < 0.1 and done < total:
            return
        if not self.tty and decile == self._last_decile and done < total:
            return
        self._last_draw, self._last_decile = now, decile
        rate = done / max(now - self.started, 1e-9)
        bar = "#" * int(fraction * 30)
        line = (f"{self.label} [{bar:<30}] {fraction:6.1%} {done:,}/{total:,} {self.unit} "
                f"{_si(rate)} {self.unit}/s")
        self.stream.write(("\r" + line) if self.tty else line + "\n")
        if self.tty and done >= total:
            self.stream.write("\n")
        self.stream.flush()


def _si(value: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= scale:
            return f"{value / scale:.2f}{unit}"
    return f"{value:.0f}"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="focalserve-client", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", default=os.environ.get("FOCALSERVE_TARGET", "localhost:50051"),
                   help="server address (default localhost:50051, or $FOCALSERVE_TARGET)")
    p.add_argument("--timeout", type=float, default=300.0, help="deadline of each call in seconds (default 300)")
    p.add_argument("--max-message-mb", type=int, default=256,
                   help="client-side message limit in MiB; larger batches are split (default 256)")
    p.add_argument("--tls-ca", help="PEM CA bundle: connect with TLS, verifying the server against it")
    p.add_argument("--tls-cert", help="PEM client certificate (mutual TLS), with --tls-key")
    p.add_argument("--tls-key", help="PEM private key of --tls-cert")
    p.add_argument("--token-file", help="file holding the bearer token (or set FOCALSERVE_TOKEN)")
    sub = p.add_subparsers(dest="command", required=True)

    def loss_options(q: argparse.ArgumentParser) -> None:
        # class_index is the Python API's spelling; the CLI's own is class-index: both work
        q.add_argument("--label-format", choices=("dense", "class-index", "class_index"), default="dense")
        q.add_argument("--alpha", type=float, help="default 0.25")
        q.add_argument("--gamma", type=float, help="default 2.0")
        q.add_argument("--normalizer", type=float,
                       help="dense: divides every loss (default 1); class-index: fg_num (default: positives)")
        q.add_argument("--reduction", choices=("none", "mean", "sum"), default="sum")
        q.add_argument("--backend", choices=("auto", "cpu", "gpu"), default="auto")
        q.add_argument("--json", action="store_true", help="print the result as one JSON object")
        q.add_argument("--progress", action="store_true", default=None,
                       help="show progress (default: when stderr is a terminal)")

    c = sub.add_parser("compute", help="loss (and gradient) of one logit/label pair of .npy files")
    c.add_argument("--logit", required=True)
    c.add_argument("--label", required=True)
    # --grad-output (the API's name) read too much like --grad-out: renamed, the old spelling kept as an alias
    c.add_argument("--upstream-grad", "--grad-output", dest="upstream_grad",
                   help=".npy upstream gradient, the API's grad_output (scalar for sum/mean, loss-shaped for none)")
    c.add_argument("--grad-out", help="compute the gradient and save it to this .npy file")
    c.add_argument("--loss-out", help="save the loss to this .npy file")
    loss_options(c)

    s = sub.add_parser("stream", help="many logit/label pairs over one stream, with a summary")
    s.add_argument("--logit", action="append", required=True, help="repeat, paired in order with --label")
    s.add_argument("--label", action="append", required=True)
    loss_options(s)

    sub.add_parser("info", help="the server's version, backends, devices and limits")
    return p


def _describe(loss: np.ndarray) -> float | dict:
    if loss.ndim == 0:
        return float(loss)
    return {"shape": list(loss.shape), "sum": float(loss.sum(dtype=np.float64))}


def _result_dict(result: ComputeResult) -> dict:
    return {"request_id": result.request_id, "loss": _describe(result.loss), "backend": result.backend,
            "elements": result.stats.elements, "positives": result.stats.positives,
            "loss_sum": result.stats.loss_sum}


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if bool(args.tls_cert) != bool(args.tls_key):  # one without the other would quietly not authenticate
        parser.error("--tls-cert and --tls-key go together (the client certificate and its private key)")
    credentials = None
    if args.tls_ca or args.tls_cert:
        def read(path):
            with open(path, "rb") as f:
                return f.read()
        credentials = grpc.ssl_channel_credentials(
            read(args.tls_ca) if args.tls_ca else None, read(args.tls_key) if args.tls_key else None,
            read(args.tls_cert) if args.tls_cert else None)
    token = (os.environ.get("FOCALSERVE_TOKEN") or "").strip() or None  # stripped like --token-file
    if args.token_file:
        with open(args.token_file) as f:
            token = f.read().strip()
    client = FocalLossClient(args.target, timeout=args.timeout, max_message_bytes=args.max_message_mb << 20,
                             credentials=credentials, token=token)
    try:
        if args.command == "info":
            info = client.server_info()
            print(json.dumps({"version": info.version, "backends": list(info.backends),
                              "default_backend": info.default_backend, "devices": list(info.devices),
                              "max_message_bytes": info.max_message_bytes, "max_elements": info.max_elements}))
            return 0
        show = sys.stderr.isatty() if args.progress is None else args.progress
        options = dict(label_format=args.label_format.replace("-", "_"), alpha=args.alpha, gamma=args.gamma,
                       normalizer=args.normalizer, reduction=args.reduction, backend=args.backend)
        if args.command == "compute":
            return _compute(client, args, options, Progress("compute", "elements", show))
        return _stream(client, args, options, Progress("stream", "items", show))
    except FocalLossError as e:
        print(f"focalserve-client: {e}", file=sys.stderr)
        for field, why in e.violations:
            if f"{field}: {why}" not in e.message:  # the server's message usually is the first violation
                print(f"  {field}: {why}", file=sys.stderr)
        return 1
    except InputError as e:
        print(f"focalserve-client: {e}", file=sys.stderr)
        return 2
    finally:
        client.close()


class InputError(Exception):
    """A file named on the command line that cannot be used."""


def _load(path: str, option: str) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e) or type(e).__name__
        raise InputError(f"cannot read {option} {path}: {reason}") from None


def _compute(client: FocalLossClient, args, options: dict, progress: Progress) -> int:
    grad_output = _load(args.upstream_grad, "--upstream-grad") if args.upstream_grad else None
    result = client.compute(_load(args.logit, "--logit"), _load(args.label, "--label"),
                            compute_grad=bool(args.grad_out),
                            grad_output=grad_output, progress=progress.update, **options)
    if args.grad_out:
        np.save(args.grad_out, result.grad)
    if args.loss_out:
        np.save(args.loss_out, result.loss)
    if args.json:
        print(json.dumps(_result_dict(result)))
    else:
        loss = result.loss
        print(f"{float(loss):.8g}" if loss.ndim == 0 else
              f"loss shape {list(loss.shape)}, sum {float(loss.sum(dtype=np.float64)):.8g}")
    return 0


def _stream(client: FocalLossClient, args, options: dict, progress: Progress) -> int:
    if len(args.logit) != len(args.label):
        print("focalserve-client: give as many --label as --logit", file=sys.stderr)
        return 2
    pairs = list(zip(args.logit, args.label))
    batches = ({"logit": _load(lg, "--logit"), "label": _load(lb, "--label"), "request_id": lg, **options}
               for lg, lb in pairs)
    failed = 0
    # read to the end (the summary comes after the call's status): stopping early would cancel the call
    for done, item in enumerate(client.stream(batches), start=1):
        if isinstance(item, StreamSummary):
            summary = {"items": item.items, "failed_items": item.failed_items, "elements": item.elements,
                       "positives": item.positives, "loss_sum": item.loss_sum,
                       "normalized_loss": item.normalized_loss}
            print(json.dumps({"summary": summary}) if args.json else
                  f"{item.items} items ({item.failed_items} failed), {item.elements:,} elements, "
                  f"loss_sum {item.loss_sum:.8g}, normalized_loss {item.normalized_loss:.8g}")
            continue
        progress.update(done, len(pairs))
        if item.error is not None:
            failed += 1
            print(f"{item.request_id}: {item.error}", file=sys.stderr)
        elif args.json:
            print(json.dumps(_result_dict(item)))
        else:
            loss = item.loss
            print(f"{item.request_id}: " + (f"{float(loss):.8g}" if loss.ndim == 0 else
                                             f"loss shape {list(loss.shape)}"))
    return 1 if failed else 0
