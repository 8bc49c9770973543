"""Training progress on stderr: step, loss, tokens/s and ETA. On a terminal a `tqdm` bar redrawn in place;
elsewhere (CI logs, a file) a plain line about twenty times per run, so logs stay readable."""
from __future__ import annotations

import sys
import time


def _hms(s: float) -> str:
    s = int(max(s, 0))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class Progress:
    def __init__(self, total: int, enabled: bool = True, start: int = 0, stream=None, desc: str = "train"):
        self.total, self.enabled, self.start = max(total, 1), enabled, start
        self.stream = stream or sys.stderr
        self.tty = getattr(self.stream, "isatty", lambda: False)()
        self.t0 = time.perf_counter()
        self.every = max(1, self.total // 20)
        self.bar = None
        if enabled and self.tty:
            from tqdm import tqdm  # installed with gguf

            self.bar = tqdm(total=self.total, initial=start, desc=desc, unit="step", file=self.stream,
                            dynamic_ncols=True, leave=True)

    def line(self, step: int, loss: float, tok_s: float) -> str:
        done = step - self.start
        rate = done / max(time.perf_counter() - self.t0, 1e-9)
        eta = (self.total - step) / rate if rate > 0 else 0.0
        return f"step {step}/{self.total} | loss {loss:.4f} | {tok_s:,.0f} tok/s | ETA {_hms(eta)}"

    def update(self, step: int, loss: float, tok_s: float) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_postfix_str(f"loss {loss:.4f}, {tok_s:,.0f} tok/s", refresh=False)
            self.bar.update(step - self.bar.n)
        elif step % self.every == 0 or step == self.total:
            self.stream.write(self.line(step, loss, tok_s) + "\n")
            self.stream.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
