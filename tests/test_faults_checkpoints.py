"""Faults around checkpoints and weights: crashes mid-write, a full disk, corrupt and malicious files, a hung hub.

Each test can fail: it checks which file survived (by its epoch and bytes), the exact error line, a
marker file that a malicious pickle would create, or a wall-clock bound a hang would exceed.
"""

from __future__ import annotations

import errno
import hashlib
import http.server
import os
import pickle
import random
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
import torch

from conftest import write_image
from finetune.checkpoint_io import atomic_save
from finetune.checkpoint_plugin import AtomicCheckpointIO
from finetune.errors import FineTuneError

REPO = Path(__file__).resolve().parents[1]


def _state(epoch: int, mb: float = 0.1) -> dict[str, Any]:
    n = int(mb * 2**20 / 4)
    return {"epoch": epoch, "w": torch.full((n,), float(epoch))}


def _epoch(path: Path) -> int:
    loaded = torch.load(path, weights_only=True)
    assert bool((loaded["w"] == loaded["epoch"]).all()), "payload does not match its epoch: a mixed file"
    return int(loaded["epoch"])


def _temps(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


def _child(code: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", **kwargs.pop("env", {})}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env=env, timeout=kwargs.pop("timeout", 120), **kwargs)


# -- item 4: atomic checkpoints --------------------------------------------------------------
def test_save_replaces_the_target_and_leaves_no_temporary_file(tmp_path: Path) -> None:
    target = tmp_path / "ckpts" / "last.ckpt"
    atomic_save(_state(1), target)
    atomic_save(_state(2), target)
    assert _epoch(target) == 2
    assert _temps(target.parent) == []


@pytest.mark.parametrize("fault", ["enospc", "interrupt"])
def test_a_write_that_fails_half_way_keeps_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        fault: str) -> None:
    import finetune.checkpoint_io as cio

    target = tmp_path / "last.ckpt"
    atomic_save(_state(1), target)
    old = target.read_bytes()
    real_fdopen = os.fdopen

    class HalfWriter:
        def __init__(self, f: Any) -> None:
            self.f = f

        def __enter__(self) -> "HalfWriter":
            return self

        def __exit__(self, *exc: Any) -> None:
            self.f.close()

        def write(self, data: Any) -> None:
            self.f.write(bytes(data)[: len(data) // 2])
            self.f.flush()
            if fault == "enospc":
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            raise KeyboardInterrupt

    monkeypatch.setattr(cio.os, "fdopen", lambda fd, mode: HalfWriter(real_fdopen(fd, mode)))
    expected = FineTuneError if fault == "enospc" else KeyboardInterrupt
    with pytest.raises(expected) as e:
        atomic_save(_state(2, mb=1), target)
    if fault == "enospc":
        assert str(e.value) == f"cannot write checkpoint '{target}': [Errno 28] No space left on device"
    assert target.read_bytes() == old and _epoch(target) == 1
    assert _temps(tmp_path) == []


def test_a_process_that_dies_mid_write_keeps_the_old_file_and_its_orphan_is_cleaned(tmp_path: Path) -> None:
    target = tmp_path / "last.ckpt"
    code = f"""
        import os, torch
        import finetune.checkpoint_io as cio
        target = {str(target)!r}
        cio.atomic_save({{"epoch": 1, "w": torch.full((50000,), 1.0)}}, target)
        real = os.fdopen
        class Dying:
            def __init__(self, f): self.f = f
            def __enter__(self): return self
            def __exit__(self, *a): pass
            def write(self, data):
                self.f.write(bytes(data)[: len(data) // 2]); self.f.flush(); os._exit(9)
        cio.os.fdopen = lambda fd, mode: Dying(real(fd, mode))
        cio.atomic_save({{"epoch": 2, "w": torch.full((500000,), 2.0)}}, target)
    """
    assert _child(code).returncode == 9
    assert _epoch(target) == 1
    orphans = _temps(tmp_path)
    assert len(orphans) == 1 and orphans[0].startswith(".last.ckpt.")  # the dead writer's, beside the target
    atomic_save(_state(3), target)  # the next save removes it: its writer is gone
    assert _epoch(target) == 3 and _temps(tmp_path) == []


def test_kill_9_at_random_moments_always_leaves_a_complete_checkpoint(tmp_path: Path) -> None:
    target = tmp_path / "last.ckpt"
    code = f"""
        import sys, torch
        from finetune.checkpoint_io import atomic_save
        for epoch in range(1, 10**6):
            atomic_save({{"epoch": epoch, "w": torch.full((4 * 2**20,), float(epoch))}}, {str(target)!r})  # 16 MB
            print(epoch, flush=True)
    """
    rng = random.Random(0)
    env = {**os.environ, "PYTHONPATH": str(REPO), "TMPDIR": str(tmp_path / "elsewhere")}
    (tmp_path / "elsewhere").mkdir()
    for _ in range(5):
        proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], stdout=subprocess.PIPE, text=True,
                                env=env)
        assert proc.stdout is not None
        first = int(proc.stdout.readline())
        time.sleep(rng.uniform(0.0, 0.4))
        proc.send_signal(signal.SIGKILL)
        rest = proc.stdout.read().split()
        proc.wait()
        saved = int(rest[-1]) if rest else first
        assert _epoch(target) >= saved  # complete, and not older than the last save reported
        assert len(_temps(tmp_path)) <= 1  # at most the killed writer's own
    assert list((tmp_path / "elsewhere").iterdir()) == []  # nothing staged in $TMPDIR


def test_a_full_disk_is_one_line_naming_the_path_and_the_old_file_survives(tmp_path: Path) -> None:
    """RLIMIT_FSIZE makes writes past 2 MiB fail with EFBIG, as a full disk fails with ENOSPC."""
    target = tmp_path / "last.ckpt"
    code = f"""
        import resource, signal, torch
        from finetune.checkpoint_io import atomic_save
        from finetune.errors import FineTuneError
        atomic_save({{"epoch": 1, "w": torch.full((1000,), 1.0)}}, {str(target)!r})
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (2 * 2**20, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
        try:
            atomic_save({{"epoch": 2, "w": torch.full((2**20,), 2.0)}}, {str(target)!r})  # 4 MiB
        except FineTuneError as e:
            print(e)
    """
    out = _child(code)
    assert out.returncode == 0, out.stderr
    assert out.stdout == f"cannot write checkpoint '{target}': [Errno 27] File too large\n"
    assert _epoch(target) == 1 and _temps(tmp_path) == []


class _TinyModule:
    """A LightningModule of one linear layer (built lazily so pytorch_lightning is imported in the test)."""

    @staticmethod
    def build() -> Any:
        import pytorch_lightning as pl

        class Tiny(pl.LightningModule):
            def __init__(self) -> None:
                super().__init__()
                self.layer = torch.nn.Linear(4, 2)

            def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
                return self.layer(batch[0]).sum()

            def configure_optimizers(self) -> Any:
                return torch.optim.SGD(self.parameters(), lr=0.1)

        return Tiny()


def test_trainer_with_the_plugin_writes_through_it_not_through_tmpdir(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    import lightning_fabric.plugins.io.torch_io as torch_io
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import ModelCheckpoint

    def staged(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("Lightning's $TMPDIR-staged writer was used")

    monkeypatch.setattr(torch_io, "_atomic_save", staged)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(8, 4)), batch_size=4)
    ckpts = tmp_path / "checkpoints"
    trainer = pl.Trainer(max_epochs=2, logger=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=tmp_path, plugins=[AtomicCheckpointIO()], accelerator="cpu",
                         callbacks=[ModelCheckpoint(dirpath=ckpts, save_last=True)])
    trainer.fit(_TinyModule.build(), data)
    assert torch.load(ckpts / "last.ckpt", weights_only=True)["epoch"] == 1
    assert _temps(ckpts) == []


# -- items 6 and 7: loading checkpoints and weights ------------------------------------------
@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real finetune checkpoint of test_resnet (3 classes), saved by a Trainer without training."""
    import pytorch_lightning as pl

    from finetune.module import FineTuneModule

    module = FineTuneModule(backbone="test_resnet", num_classes=3, pretrained=False, class_names=["a", "b", "c"])
    trainer = pl.Trainer(logger=False, enable_checkpointing=False, accelerator="cpu", plugins=[AtomicCheckpointIO()])
    trainer.strategy.connect(module)
    path = tmp_path_factory.mktemp("ckpt") / "good.ckpt"
    trainer.save_checkpoint(path)
    return path


def _edited(ckpt: Path, dest: Path, key: str | None, value: float) -> tuple[Path, str]:
    raw = torch.load(ckpt, weights_only=True)
    key = key or next(k for k, v in raw["state_dict"].items() if v.is_floating_point() and v.ndim > 1)
    raw["state_dict"][key] = raw["state_dict"][key].clone(memory_format=torch.contiguous_format)
    raw["state_dict"][key].view(-1)[0] = value
    torch.save(raw, dest)
    return dest, key


def test_the_good_checkpoint_loads(ckpt: Path) -> None:
    from finetune.checkpoints import load_checkpoint

    module, raw = load_checkpoint(ckpt)
    assert module.hparams.backbone == "test_resnet" and "state_dict" in raw


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_non_finite_weight_is_refused_naming_the_checkpoint_and_tensor(ckpt: Path, tmp_path: Path,
                                                                          value: float) -> None:
    from finetune.checkpoints import load_checkpoint

    bad, key = _edited(ckpt, tmp_path / "bad.ckpt", None, value)
    with pytest.raises(FineTuneError) as e:
        load_checkpoint(bad)
    msg = str(e.value)
    assert f"checkpoint '{bad}' has non-finite weights: {key} holds" in msg and "\n" not in msg


def test_outputs_that_overflow_stop_inference_naming_the_checkpoint(ckpt: Path, tmp_path: Path) -> None:
    """Finite weights whose logits overflow to inf would give NaN probabilities."""
    from finetune.checkpoints import load_checkpoint
    from finetune.inference import probabilities

    raw = torch.load(ckpt, weights_only=True)
    head = [k for k in raw["state_dict"] if k.startswith("head") and k.endswith("weight")][-1]
    raw["state_dict"][head] = torch.full_like(raw["state_dict"][head], 3e38)
    torch.save(raw, tmp_path / "huge.ckpt")
    module, _ = load_checkpoint(tmp_path / "huge.ckpt")
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.rand(4, 3, 32, 32)), batch_size=2)
    with pytest.raises(FineTuneError, match=r"checkpoint '.*huge\.ckpt' gives non-finite outputs"):
        probabilities(module, loader)


def test_predict_cli_on_a_nan_checkpoint_is_one_error_line_exit_2(ckpt: Path, tmp_path: Path) -> None:
    bad, key = _edited(ckpt, tmp_path / "nan.ckpt", None, float("nan"))
    image = write_image(tmp_path / "img.png", np.random.default_rng(0), size=32)
    out = subprocess.run([sys.executable, "-m", "finetune.predict", f"ckpt={bad}", f"images={image}",
                          f"out={tmp_path / 'p.csv'}"], capture_output=True, text=True, cwd=tmp_path, timeout=300,
                         env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)})
    assert out.returncode == 2, out.stderr[-2000:]
    errors = [ln for ln in out.stderr.splitlines() if ln.startswith("error:")]
    assert errors == [f"error: checkpoint '{bad}' has non-finite weights: {key} holds 1 NaN and 0 inf of "
                      f"{torch.load(ckpt, weights_only=True)['state_dict'][key].numel()} values "
                      "(a corrupted file, or a run that diverged)"]
    assert not (tmp_path / "p.csv").exists()


def _broken(kind: str, ckpt: Path, tmp_path: Path) -> Path:
    path = tmp_path / f"{kind}.ckpt"
    if kind == "plain_state_dict":
        torch.save(torch.load(ckpt, weights_only=True)["state_dict"], path)
    elif kind == "truncated":
        data = ckpt.read_bytes()
        path.write_bytes(data[: len(data) * 6 // 10])
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "random_bytes":
        path.write_bytes(np.random.default_rng(0).bytes(5000))
    elif kind == "no_hparams":
        raw = torch.load(ckpt, weights_only=True)
        raw.pop("hyper_parameters")
        torch.save(raw, path)
    return path


@pytest.mark.parametrize("kind, reason", [
    ("plain_state_dict", "is not a Lightning checkpoint (a plain state dict? use backbone.weights=PATH"),
    ("truncated", "truncated or corrupt"),
    ("empty", "the file is empty (0 bytes): truncated or corrupt"),
    ("random_bytes", "truncated or corrupt, or not a PyTorch file"),
    ("no_hparams", "is a Lightning checkpoint, but not one of finetune"),
])
def test_a_broken_checkpoint_is_one_line_saying_what_is_wrong(ckpt: Path, tmp_path: Path, kind: str,
                                                              reason: str) -> None:
    from finetune.checkpoints import load_checkpoint

    path = _broken(kind, ckpt, tmp_path)
    with pytest.raises(FineTuneError) as e:
        load_checkpoint(path)
    msg = str(e.value)
    assert str(path) in msg and reason in msg, msg
    assert "\n" not in msg and "mmap" not in msg and "pytorch-lightning_version" not in msg


def test_a_checkpoint_in_torchs_legacy_format_still_loads(ckpt: Path, tmp_path: Path) -> None:
    from finetune.checkpoints import load_checkpoint

    legacy = tmp_path / "legacy.ckpt"
    torch.save(torch.load(ckpt, weights_only=True), legacy, _use_new_zipfile_serialization=False)
    module, _ = load_checkpoint(legacy)
    assert module.hparams.num_classes == 3


class _Payload:
    marker = ""

    def __reduce__(self) -> Any:
        return (open, (self.marker, "w"))  # creates the marker file when unpickled


def _malicious(path: Path, marker: Path, as_torch: bool) -> Path:
    payload = _Payload()
    payload.marker = str(marker)
    obj = {"state_dict": {"w": payload}, "pytorch-lightning_version": "2.6.0"}
    if as_torch:
        torch.save(obj, path)
    else:
        path.write_bytes(pickle.dumps(obj))
    return path


@pytest.mark.parametrize("as_torch", [True, False], ids=["torch_save", "raw_pickle"])
def test_a_malicious_pickle_runs_nothing_as_checkpoint_or_as_weights(tmp_path: Path, as_torch: bool) -> None:
    from finetune.backbones import create_backbone
    from finetune.checkpoints import load_checkpoint

    probe = tmp_path / "probe"
    pickle.loads(_malicious(tmp_path / "probe.pkl", probe, as_torch=False).read_bytes())
    assert probe.exists()  # the payload is live: unpickled unsafely it creates its marker

    marker = tmp_path / "PWNED"
    evil = _malicious(tmp_path / "evil.pth", marker, as_torch)
    with pytest.raises(FineTuneError) as as_ckpt:
        load_checkpoint(evil)
    with pytest.raises(FineTuneError) as as_weights:
        create_backbone("test_resnet", weights=evil)
    assert not marker.exists()
    for e, what in ((as_ckpt, "checkpoint"), (as_weights, "weights file")):
        msg = str(e.value)
        assert msg.startswith(f"cannot {'load' if what == 'checkpoint' else 'read'} {what} '{evil}': ")
        assert "\n" not in msg and "weights_only` set to `False`" not in msg
        if as_torch:
            assert "holds Python objects, not only tensors (io.open); refused without running anything" in msg


# -- item 9: a hub that accepts connections and never replies ---------------------------------
@pytest.fixture
def silent_server() -> Iterator[tuple[int, list[socket.socket]]]:
    """127.0.0.1:PORT that accepts connections and never replies (the first one optionally gets a 404)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(32)
    server.settimeout(0.2)
    held: list[socket.socket] = []
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                continue
            held.append(conn)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield server.getsockname()[1], held
    stop.set()
    thread.join(2)
    for c in held:
        c.close()
    server.close()


_HUB_CHILD = """
    import time
    import finetune.hub as hub
    from finetune.backbones import create_backbone
    hub.HUB_STALL_S = 2.0
    start = time.monotonic()
    try:
        built = create_backbone("test_resnet", pretrained=True)
        print("loaded", built.weights_source)
    except Exception as e:
        print(type(e).__name__, e)
    print(f"elapsed {time.monotonic() - start:.1f}")
"""


def _hub_env(port: int, tmp_path: Path) -> dict[str, str]:
    return {"HF_ENDPOINT": f"http://127.0.0.1:{port}", "HF_HUB_OFFLINE": "0", "HF_HOME": str(tmp_path / "hf"),
            "TORCH_HOME": str(tmp_path / "torch"), "NO_PROXY": "127.0.0.1", "no_proxy": "127.0.0.1"}


def _elapsed(stdout: str) -> float:
    return float(stdout.strip().splitlines()[-1].split()[1])


def test_a_hub_that_never_replies_is_given_up_within_seconds(silent_server, tmp_path: Path) -> None:
    port, held = silent_server
    out = _child(_HUB_CHILD, env=_hub_env(port, tmp_path), timeout=90)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "FineTuneError no pretrained weights found for 'test_resnet'; tried: hub (127.0.0.1 accepted the " \
           "connection but gave no reply within 3 s); offline package (" in out.stdout, out.stdout
    assert held  # the server was really contacted
    assert _elapsed(out.stdout) < 10  # 3 s probe; huggingface_hub alone waited 193 s


def _start_http(handler: type[http.server.BaseHTTPRequestHandler]) -> tuple[http.server.ThreadingHTTPServer, int]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, server.server_address[1]


def test_a_hub_that_answers_the_probe_then_stalls_is_given_up(tmp_path: Path) -> None:
    calls: list[str] = []

    class FirstOnly(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self) -> None:
            calls.append(self.path)
            if len(calls) == 1:  # the probe gets an answer; huggingface_hub's own requests hang
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()
            else:
                time.sleep(30)

        do_GET = do_HEAD

        def log_message(self, *args: Any) -> None:
            pass

    server, port = _start_http(FirstOnly)
    try:
        out = _child(_HUB_CHILD, env=_hub_env(port, tmp_path), timeout=90)
    finally:
        server.shutdown()
    assert "tried: hub (the download made no progress for 2 s)" in out.stdout, out.stdout + out.stderr[-2000:]
    assert len(calls) >= 2 and _elapsed(out.stdout) < 10


def test_a_hub_that_answers_still_downloads_through_the_bounded_path(tmp_path: Path) -> None:
    """A local stand-in for the hub serving test_resnet's weights: the watchdog does not cut a live download."""
    import timm
    from safetensors.torch import save_file

    weights = tmp_path / "model.safetensors"
    source = timm.create_model("test_resnet")
    save_file(source.state_dict(), str(weights))
    body = weights.read_bytes()
    sha = hashlib.sha256(body).hexdigest()

    class Hub(http.server.BaseHTTPRequestHandler):
        def _headers(self) -> bool:
            if not self.path.endswith("/resolve/main/model.safetensors"):
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return False
            self.send_response(200)
            for k, v in (("ETag", f'"{sha}"'), ("X-Repo-Commit", "a" * 40), ("Content-Length", str(len(body)))):
                self.send_header(k, v)
            self.end_headers()
            return True

        def do_HEAD(self) -> None:
            self._headers()

        def do_GET(self) -> None:
            if self._headers():
                self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server, port = _start_http(Hub)
    try:
        out = _child(_HUB_CHILD, env=_hub_env(port, tmp_path), timeout=90)
    finally:
        server.shutdown()
    assert "loaded hub:timm/test_resnet.r160_in1k" in out.stdout, out.stdout + out.stderr[-2000:]
