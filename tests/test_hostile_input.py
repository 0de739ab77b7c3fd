"""Hostile input (issue 8): a corpus of bad files, each with its documented outcome.

Every file is built here, in a temporary directory, from synthetic PyAV videos or by editing the
bytes of one. The outcome is either a 4xx at upload (the API's bounded probe refuses it) or a job
that ends ``failed`` with a message, or, where the file is odd but harmless, a job that finishes;
never a hang, never a crashed worker. The API and two real workers are the session's (conftest).
``tests/test_service.py`` already covers empty and text uploads, a half-truncated mp4, a
single-frame video and an oversized upload; the corpus below extends that list.

Also here: the static guarantees that back the corpus (decoding bounded before allocation, the
JSON serializer on the queue, ``weights_only=True`` checkpoints, client filenames never used as paths).
"""

from __future__ import annotations

import ast
import io
import json
import struct
import zlib
from pathlib import Path

import av
import httpx
import numpy as np
import pytest
from conftest import ALICE, settings_from_env, smooth_frames, wait_done, write_video

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]


def submit_bytes(api: str, data: bytes, filename: str = "clip.mp4", **params) -> httpx.Response:
    return httpx.post(
        f"{api}/classify", params=params, files={"file": (filename, data, "video/mp4")}, headers=ALICE, timeout=60
    )


# --- Building the corpus ---------------------------------------------------------------------------


def encode(frames: np.ndarray, fmt: str = "mp4", codec: str = "libx264", pix: str = "yuv420p", rate=25, corrupt=None):
    """Encode (N, H, W, 3) uint8 frames; ``corrupt``: index of a packet whose payload becomes noise."""
    buffer = io.BytesIO()
    rng = np.random.default_rng(7)
    with av.open(buffer, "w", format=fmt) as container:
        stream = container.add_stream(codec, rate=rate)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = pix
        count = 0

        def mux(packet):
            nonlocal count
            if count == corrupt:
                bad = av.Packet(rng.integers(0, 256, packet.size, dtype=np.uint8).tobytes())
                bad.pts, bad.dts, bad.time_base, bad.stream = packet.pts, packet.dts, packet.time_base, packet.stream
                packet = bad
            container.mux(packet)
            count += 1

        for image in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")):
                mux(packet)
        for packet in stream.encode():
            mux(packet)
    return buffer.getvalue()


def png(height: int = 32, width: int = 32) -> bytes:
    raw = b"".join(b"\x00" + bytes(width * 3) for _ in range(height))  # black RGB rows

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def audio_only() -> bytes:
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as container:
        stream = container.add_stream("aac", rate=16000)
        for i in range(20):
            tone = np.sin(np.arange(1024, dtype=np.float32) * 0.05 + i)[None] * 0.1
            frame = av.AudioFrame.from_ndarray(tone.astype(np.float32), format="fltp", layout="mono")
            frame.sample_rate = 16000
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buffer.getvalue()


def y4m_declaring(width: int, height: int) -> bytes:
    """A real 16x16 YUV4MPEG2 file whose header is edited to declare width x height."""
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="yuv4mpegpipe") as container:
        stream = container.add_stream("rawvideo", rate=25)
        stream.width = stream.height = 16
        stream.pix_fmt = "yuv420p"
        for image in smooth_frames(4, 16, 16):
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
    data = buffer.getvalue()
    assert data.startswith(b"YUV4MPEG2 W16 H16 ")
    return data.replace(b"W16 H16", f"W{width} H{height}".encode(), 1)


def avi_declaring_frames(tmp_path: Path, frames: int) -> bytes:
    """An MPEG-4 AVI whose main header and stream header declare ``frames`` frames."""
    data = bytearray(write_video(tmp_path / "v.avi", count=12, kind="avi").read_bytes())
    avih = data.find(b"avih")  # dwTotalFrames: 5th DWORD of the main header
    assert struct.unpack_from("<I", data, avih + 8 + 16)[0] == 12
    struct.pack_into("<I", data, avih + 8 + 16, frames)
    strh = data.find(b"strh")  # dwLength: 9th DWORD of the stream header
    assert struct.unpack_from("<I", data, strh + 8 + 32)[0] == 12
    struct.pack_into("<I", data, strh + 8 + 32, frames)
    return bytes(data)


def mp4_declaring_size(tmp_path: Path, width: int, height: int) -> bytes:
    """A 96x80 H.264 mp4 whose track header (tkhd) and sample entry (avc1) declare width x height."""
    data = bytearray(write_video(tmp_path / "v.mp4", count=12).read_bytes())
    tkhd = data.find(b"tkhd") + 4 + 4 + 20 + 8 + 8 + 36  # v0: flags, times, ids, layer..., matrix
    assert struct.unpack_from(">II", data, tkhd) == (96 << 16, 80 << 16)
    struct.pack_into(">II", data, tkhd, width << 16, height << 16)
    avc1 = data.find(b"avc1", data.find(b"stsd")) + 4 + 6 + 2 + 16
    assert struct.unpack_from(">HH", data, avc1) == (96, 80)
    struct.pack_into(">HH", data, avc1, width & 0xFFFF, height & 0xFFFF)
    return bytes(data)


# --- Refused at upload (4xx) -------------------------------------------------------------------------

REFUSED = {
    # name: (builder(tmp_path) -> bytes, status, error code, words in the message)
    "zero_bytes": (lambda tmp: b"", 415, "not_a_video", "empty"),
    "random_bytes_named_mp4": (
        lambda tmp: np.random.default_rng(0).bytes(50_000),
        415,
        "not_a_video",
        "not a readable",
    ),
    "png_image": (lambda tmp: png(), 415, "not_a_video", "at least 2"),
    "audio_only_mp4": (lambda tmp: audio_only(), 415, "not_a_video", "no video stream"),
    "truncated_mp4_10pct": (
        lambda tmp: (lambda d: d[: len(d) // 10])(write_video(tmp / "t.mp4", count=24).read_bytes()),
        415,
        "not_a_video",
        "not a readable",
    ),
    "truncated_mp4_90pct": (
        lambda tmp: (lambda d: d[: len(d) * 9 // 10])(write_video(tmp / "t.mp4", count=24).read_bytes()),
        415,
        "not_a_video",
        "not a readable",
    ),
    "y4m_header_declares_8000x8000": (lambda tmp: y4m_declaring(8000, 8000), 413, "video_too_large", "8000x8000"),
    "y4m_header_declares_40000x40000": (lambda tmp: y4m_declaring(40000, 40000), 415, "not_a_video", "readable"),
    "avi_header_declares_2e9_frames": (
        lambda tmp: avi_declaring_frames(tmp, 2_000_000_000),
        413,
        "video_too_large",
        "video lasts",
    ),
    "longer_than_max_duration": (
        lambda tmp: encode(smooth_frames(700, 16, 16), rate=1),
        413,
        "video_too_large",
        "video lasts",
    ),
}


@pytest.mark.parametrize("name", list(REFUSED))
def test_refused_at_upload(api, service_env, tmp_path, name):
    build, status, code, words = REFUSED[name]
    uploads = settings_from_env(service_env).upload_dir
    before = set(uploads.glob("*"))
    response = submit_bytes(api, build(tmp_path))
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and words in error["message"], error
    assert set(uploads.glob("*")) <= before  # the refused upload left nothing behind


# --- Accepted: the job ends finished (harmless oddity) or failed with a message ----------------------


def test_mp4_whose_container_declares_absurd_size_is_decoded_at_its_real_size(api, tmp_path):
    """FFmpeg takes an H.264 stream's size from its SPS, not from tkhd/avc1: the edited header is
    ignored, the job runs at the real 96x80."""
    response = submit_bytes(api, mp4_declaring_size(tmp_path, 60000, 60000), steps=1)
    assert response.status_code == 202, response.text
    body = wait_done(api, response.json()["job_id"])
    assert body["status"] == "finished", body
    assert (body["result"]["video"]["width"], body["result"]["video"]["height"]) == (96, 80)


def test_very_long_video_is_cut_at_the_clip_cap(api, tmp_path):
    """1500 frames (60 s): only max_clips (4 in the test env) clips are analysed, the result says so."""
    data = encode(smooth_frames(1500, 32, 32))
    assert len(data) < 3_000_000
    response = submit_bytes(api, data, steps=1)
    assert response.status_code == 202, response.text
    body = wait_done(api, response.json()["job_id"])
    assert body["status"] == "finished", body
    assert len(body["result"]["clips"]) == 4 and body["result"]["video"]["truncated"]


@pytest.mark.parametrize("kind", ["h264_mp4", "mpeg4_avi"])
def test_corrupt_frame_in_the_middle(api, tmp_path, kind):
    """Packet 20 of 40 replaced by noise: H.264 conceals it, MPEG-4 decoding stops there; either way
    the frames that decode are classified and the job finishes."""
    codec, fmt = {"h264_mp4": ("libx264", "mp4"), "mpeg4_avi": ("mpeg4", "avi")}[kind]
    response = submit_bytes(api, encode(smooth_frames(40, 64, 64), fmt=fmt, codec=codec, corrupt=20), steps=1)
    assert response.status_code == 202, response.text
    body = wait_done(api, response.json()["job_id"])
    assert body["status"] == "finished", body
    assert len(body["result"]["clips"]) >= 4  # at least 16 of the 40 frames decoded


@pytest.mark.parametrize("kind", ["ffv1_mkv", "h264_yuv444_mp4"])
def test_one_pixel_video(api, tmp_path, kind):
    """1x1 pixels: upscaled to the bundle's 64x64; the job finishes (a flat clip, meaningless labels)."""
    codec, fmt, pix = {"ffv1_mkv": ("ffv1", "matroska", "bgr0"), "h264_yuv444_mp4": ("libx264", "mp4", "yuv444p")}[kind]
    frames = np.stack([np.full((1, 1, 3), 40 * i, np.uint8) for i in range(6)])
    response = submit_bytes(api, encode(frames, fmt=fmt, codec=codec, pix=pix), steps=1)
    assert response.status_code == 202, response.text
    body = wait_done(api, response.json()["job_id"])
    assert body["status"] == "finished", body
    assert (body["result"]["video"]["width"], body["result"]["video"]["height"]) == (1, 1)


def test_hostile_filenames_never_become_paths(api, service_env, tmp_path):
    """``../../etc/passwd.mp4`` and a non-UTF-8 name: accepted (the name is ignored), the upload is
    stored as ``uploads/<job id>.upload``, and nothing is written outside the data directory."""
    settings = settings_from_env(service_env)
    video = write_video(tmp_path / "v.mp4", count=4).read_bytes()
    before = set(settings.data_dir.parent.iterdir())
    traversal = submit_bytes(api, video, filename="../../etc/passwd.mp4", steps=1)
    boundary = "hostileboundary"
    body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="'.encode()
        + b"\xff\xfe\x80\xc3(../\xe9t\xe9.mp4"
        + b'"\r\nContent-Type: video/mp4\r\n\r\n'
        + video
        + f"\r\n--{boundary}--\r\n".encode()
    )
    raw = httpx.post(
        f"{api}/classify",
        params={"steps": 1},
        content=body,
        headers={**ALICE, "Content-Type": f"multipart/form-data; boundary={boundary}"},
        timeout=60,
    )
    for response in (traversal, raw):
        assert response.status_code == 202, response.text
        job_id = response.json()["job_id"]
        assert wait_done(api, job_id)["status"] == "finished"
        assert sorted(p.name for p in (settings.blob_dir / job_id).iterdir())[0].startswith("clip0.")
    assert not Path("/etc/passwd.mp4").exists()
    assert set(settings.data_dir.parent.iterdir()) == before
    names = [p.relative_to(settings.data_dir) for p in settings.data_dir.rglob("*")]
    assert not [n for n in names if "passwd" in str(n) or ".." in n.parts or not str(n).isascii()], names


def test_many_bad_uploads_leave_the_workers_serving(api, workers, tmp_path):
    """After the corpus, the workers are alive and a normal job still finishes."""
    alive = [proc for proc in workers.procs if proc.poll() is None]
    assert alive and len(workers.live()) == len(alive)
    response = submit_bytes(api, write_video(tmp_path / "v.mp4", count=4).read_bytes(), steps=1)
    assert wait_done(api, response.json()["job_id"])["status"] == "finished"


# --- Static guarantees -------------------------------------------------------------------------------


def test_decoding_is_bounded_before_allocation(tmp_path, monkeypatch):
    """The declared size is refused before a single frame is decoded, by the API's probe and by the
    worker's decoder alike; a declared frame count is bounded through the duration, and decoding
    stops at ``max_frames`` whatever the container says."""
    from worker import video
    from worker.video import VideoLimits, VideoTooLarge, decode_video, probe_video

    path = tmp_path / "big.y4m"
    path.write_bytes(y4m_declaring(8000, 8000))
    decoded = []
    real_check = video._check_frame
    monkeypatch.setattr(video, "_check_frame", lambda frame, limits: decoded.append(1) or real_check(frame, limits))
    for call in (lambda: probe_video(path), lambda: decode_video(path, 64, 64)):
        with pytest.raises(VideoTooLarge, match="8000x8000"):
            call()
    assert decoded == []
    frames_path = tmp_path / "frames.avi"
    frames_path.write_bytes(avi_declaring_frames(tmp_path, 2_000_000_000))
    with pytest.raises(VideoTooLarge, match="video lasts"):
        decode_video(frames_path, 64, 64)
    long_path = tmp_path / "long.mp4"
    long_path.write_bytes(encode(smooth_frames(50, 16, 16)))
    capped = decode_video(long_path, 16, 16, limits=VideoLimits(max_frames=10))
    assert capped.frames.shape[0] == 10 and capped.truncated


def test_queue_payloads_are_json_never_pickle(api, service_env, tmp_path):
    """RQ's JSON serializer on every queue the service builds, and the stored job hash holds JSON."""
    from redis import Redis
    from rq.serializers import JSONSerializer

    from worker.queueing import make_queue

    settings = settings_from_env(service_env)
    connection = Redis.from_url(settings.redis_url)
    assert make_queue(connection, settings).serializer is JSONSerializer
    response = submit_bytes(api, write_video(tmp_path / "v.mp4", count=4).read_bytes(), steps=1)
    job_id = response.json()["job_id"]
    fields = connection.hgetall(f"rq:job:{job_id}")
    data = json.loads(zlib.decompress(fields[b"data"]))
    # No defend= in the upload: None, the worker applies the bundle's (or the settings') default mode.
    assert data[0] == "worker.serving.jobs.analyse_job" and data[2] == [
        {"defend": None, "top_k": 5, "multi": None, "steps": 1, "epsilon": None}
    ]
    assert json.loads(fields[b"meta"])["owner"]
    for name, value in fields.items():
        assert not value.startswith(b"\x80"), f"{name!r} looks pickled"  # pickle protocol 2+ header
    wait_done(api, job_id)
    # Every module that builds an RQ queue or job passes the JSON serializer.
    for path in [*ROOT.glob("service/*.py"), *ROOT.glob("worker/*.py")]:
        text = path.read_text()
        for call in ("Queue(", "Job.fetch(", "SimpleWorker(", "ModelWorker("):
            if f" {call}" in text or f"({call}" in text or f"={call}" in text:
                for line in [line for line in text.splitlines() if call in line and "class " not in line]:
                    assert "serializer=JSONSerializer" in line, f"{path.name}: {line.strip()}"


def _torch_load_calls(path: Path) -> list[ast.Call]:
    tree = ast.parse(path.read_text())
    return [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "load"
        and isinstance(node.func.value, ast.Name)
        and node.func.value.id == "torch"
    ]


def test_checkpoints_load_with_weights_only():
    """Every torch.load on the serving path (bundle and checkpoint loading, worker, service) passes
    weights_only=True; so does the training code when it resumes its own state."""
    checked = 0
    for path in [*ROOT.glob("models/**/*.py"), *ROOT.glob("worker/**/*.py"), *ROOT.glob("service/**/*.py")]:
        for call in _torch_load_calls(path):
            flags = {kw.arg: kw.value for kw in call.keywords}
            assert "weights_only" in flags and getattr(flags["weights_only"], "value", None) is True, (
                f"{path.name}:{call.lineno}"
            )
            checked += 1
    assert checked >= 1


def test_uploaded_filenames_are_never_read():
    """The upload parser reads the part's ``name`` only; no code under service/ or worker/ looks at
    the client's ``filename``, and stored uploads are named by the job id (validated hex)."""
    from worker.settings import Settings
    from worker.storage import upload_path

    for path in [*ROOT.glob("service/*.py"), *ROOT.glob("worker/*.py")]:
        text = path.read_text()
        assert 'b"filename"' not in text and "'filename'" not in text and ".filename" not in text, path.name
    settings = Settings(data_dir=Path("/srv/data"))
    assert upload_path(settings, "a" * 32) == Path("/srv/data/uploads") / ("a" * 32 + ".upload")
    for hostile in ("../../etc/passwd", "a" * 31 + "/", "A" * 32, "../" + "a" * 29):
        with pytest.raises(ValueError):
            upload_path(settings, hostile)
