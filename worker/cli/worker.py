"""``motionguard worker``: one long-lived model worker (bundle loaded once, no fork per job).

SIGTERM/SIGINT: warm shutdown (the running job finishes, then the process exits); a second
signal is a cold shutdown. Heartbeats let the others requeue or fail this worker's job within
seconds if it is killed outright. ``--max-batch-clips N`` (> 1) makes it a batching worker
(``worker.serving.batching``): the clips of several queued jobs are purified as one batch.

``--model NAME[:VERSION]`` picks a bundle of the model repository (``worker.repository``; default:
``MOTIONGUARD_BUNDLE_DIR``'s). The worker takes jobs from that model's queue and from its own
bundle's pinned queue, and runs only jobs admitted for exactly its bundle (``worker.serving.routing``).
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import uuid

log = logging.getLogger(__name__)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default=None, help="cpu or cuda[:n] (default: MOTIONGUARD_DEVICE or cpu)")
    parser.add_argument("--queues", nargs="+", default=None, help="queue names (default: MOTIONGUARD_QUEUE_NAME)")
    parser.add_argument("--burst", action="store_true", help="exit when the queues are empty")
    parser.add_argument("--bundle", default=None, help="bundle directory (default: MOTIONGUARD_BUNDLE_DIR)")
    parser.add_argument(
        "--model",
        default=None,
        metavar="NAME[:VERSION]",
        help="serve this model of the repository (MOTIONGUARD_MODEL_REPOSITORY; default: the highest version)",
    )
    parser.add_argument("--name", default=None, help="worker name (default: host.pid.random)")
    parser.add_argument(
        "--max-batch-clips",
        type=int,
        default=None,
        metavar="N",
        help="purify the clips of several queued jobs as one batch of up to N clips "
        "(default: MOTIONGUARD_MAX_BATCH_CLIPS or 1, one job at a time)",
    )
    parser.add_argument(
        "--max-batch-delay-ms",
        type=float,
        default=None,
        metavar="D",
        help="wait at most D ms for more jobs to fill a batch (default: MOTIONGUARD_MAX_BATCH_DELAY_MS or 10)",
    )


def run(args: argparse.Namespace) -> int:
    from redis import Redis
    from rq.serializers import JSONSerializer

    from models.errors import UserError
    from worker.settings import get_settings

    settings = get_settings()
    if args.model and args.bundle:
        raise UserError("--model and --bundle both name the bundle: give one")
    if args.max_batch_clips is not None and args.max_batch_clips < 1:
        raise UserError("--max-batch-clips must be at least 1")
    if args.max_batch_delay_ms is not None and args.max_batch_delay_ms < 0:
        raise UserError("--max-batch-delay-ms must be >= 0")
    updates = {
        k: v
        for k, v in {
            "device": args.device,
            "bundle_dir": args.bundle,
            "max_batch_clips": args.max_batch_clips,
            "max_batch_delay_ms": args.max_batch_delay_ms,
        }.items()
        if v is not None
    }
    if updates:
        settings = settings.model_copy(update=updates)
    if not settings.redis_url:
        raise UserError("MOTIONGUARD_REDIS_URL is not set: a worker needs the service's Redis")

    default_dir = settings.bundle_dir  # its model keeps the plain queue (worker.queueing)
    if args.model:
        settings = settings.model_copy(update={"bundle_dir": _model_dir(settings, args.model)})

    import torch

    from models.bundle.load import load_bundle
    from worker.liveness import LivenessThread
    from worker.queueing import make_queue, model_queue, pinned_queue
    from worker.recovery import RecoveryThread
    from worker.repository import bundle_digest
    from worker.serving import runtime
    from worker.serving.routing import RoutedWorker

    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    digest = bundle_digest(settings.bundle_dir)  # before loading: the weights are checked against this file
    bundle = load_bundle(settings.bundle_dir, device=settings.device, **settings.bundle_overrides)
    identity = {"name": bundle.meta.name, "version": bundle.meta.version, "sha256": digest}
    connection = Redis.from_url(settings.redis_url)
    if args.queues:
        queues = [make_queue(connection, settings.model_copy(update={"queue_name": name})) for name in args.queues]
    else:
        queues = [model_queue(connection, settings.model_copy(update={"bundle_dir": default_dir}), identity["name"])]
    name = args.name or f"{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:6]}"
    worker = RoutedWorker(queues, connection=connection, serializer=JSONSerializer, name=name)
    worker.settings = settings
    worker.identity = identity
    worker.pinned = pinned_queue(connection, settings, identity["name"], digest)
    runtime.configure(settings, connection, bundle, worker_name=name, identity=identity)
    info = {
        "bundle": bundle.meta.name,
        "version": bundle.meta.version,
        "sha256": digest,
        "device": settings.device,
        "queues": [*(q.name for q in queues), worker.pinned.name],
    }
    liveness = LivenessThread(worker, settings, info)
    recovery = RecoveryThread(connection, settings)
    liveness.start()
    recovery.start()
    log.info(
        "worker %s: %s v%s (sha256 %.12s) from %s on %s, batches of up to %d clip(s) (delay %.0f ms)",
        name,
        identity["name"],
        identity["version"],
        digest,
        ", ".join(q.name for q in queues),
        settings.device,
        settings.max_batch_clips,
        settings.max_batch_delay_ms,
    )
    try:
        worker.work(burst=args.burst, with_scheduler=False, logging_level=logging.getLevelName(log.getEffectiveLevel()))
    finally:
        recovery.stop()
        liveness.stop()
    return 0


def _model_dir(settings, spec: str):
    """The bundle directory of ``--model NAME[:VERSION]`` in the model repository."""
    from models.errors import UserError
    from worker.repository import ModelNotFound, Repository

    name, _, version = spec.partition(":")
    try:
        return Repository.scan(settings).resolve(name, version or None, served_only=False).path
    except ModelNotFound as exc:
        raise UserError(f"--model {spec}: {exc}") from None
