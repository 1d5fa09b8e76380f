"""Where and how a process runs: device and dtype choice, and clean stops on SIGTERM/SIGINT."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable, Mapping
from types import FrameType

import torch

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def exit_code_for(signal_name: str) -> int:
    """Exit status of a run stopped by a signal, by the shell's convention: 128 + the signal's number."""
    return 128 + signal.Signals[signal_name].value


class DeviceError(ValueError):
    """A device setting this machine cannot honour (no CUDA, no such GPU, not a device name)."""


def resolve_device(spec: str, environ: Mapping[str, str] = os.environ) -> torch.device:
    """`auto`: this process's GPU (LOCAL_RANK under torchrun) when CUDA is present, else the CPU.

    An explicit device must exist here: DeviceError says why it does not."""
    if spec != "auto":
        try:
            device = torch.device(spec)
        except RuntimeError:
            raise DeviceError(f"{spec!r} is not a device name (auto, cpu, cuda or cuda:N)") from None
        if device.type == "cuda":
            if not torch.cuda.is_available():
                raise DeviceError(
                    f"{spec!r} requested but CUDA is not available on this machine "
                    "(device: auto uses a GPU when there is one)"
                )
            if device.index is not None and device.index >= torch.cuda.device_count():
                raise DeviceError(f"{spec!r} requested but this machine has {torch.cuda.device_count()} GPU(s)")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda", int(environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
    return torch.device("cpu")


def is_out_of_memory(error: BaseException) -> bool:
    """An allocation failure: CUDA's OutOfMemoryError, Python's MemoryError, or the CPU allocator's RuntimeError."""
    if isinstance(error, (torch.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(error, RuntimeError) and "can't allocate memory" in str(error)


def resolve_dtype(spec: str, device: torch.device) -> torch.dtype:
    """`auto`: bfloat16 on CUDA, float32 on the CPU."""
    if spec == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[spec]


class StopRequest:
    """Turns the first stop signal into a flag the work loop polls (and calls `on_stop` with it, to say so at
    once); a second SIGINT interrupts at once (KeyboardInterrupt).

    Handlers are installed only from the main thread (elsewhere a stop is never requested)."""

    def __init__(
        self,
        signals: tuple[signal.Signals, ...] = STOP_SIGNALS,
        on_stop: Callable[[signal.Signals], None] | None = None,
    ) -> None:
        self.signals = signals
        self.signal: signal.Signals | None = None
        self.on_stop = on_stop
        self._previous: dict[signal.Signals, object] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        first = self.signal is None
        self.signal = signal.Signals(signum)  # before on_stop: a second SIGINT may arrive while it prints
        if first and self.on_stop is not None:
            self.on_stop(self.signal)

    @property
    def requested(self) -> bool:
        return self.signal is not None
