"""The Java side of caption evaluation: one long-lived METEOR 1.5 process, and ``check_java``.

pycocoevalcap's ``Meteor`` class starts ``java -jar meteor-1.5.jar - - -stdio -l en -norm``
and speaks a line protocol on its stdin/stdout:

* ``SCORE ||| ref 1 ||| ... ||| ref n ||| hypothesis`` -> one line of sufficient statistics
  (space-separated numbers) for that segment;
* ``EVAL ||| stats 1 ||| ... ||| stats N`` -> N lines (per-segment METEOR) and one more line,
  the corpus-level METEOR computed from the summed statistics.

:class:`MeteorProcess` starts the same jar with the same arguments but controls what the
wrapper cannot: the locale (the jar parses the statistics back with ``java.util.Scanner``,
which expects a decimal comma under e.g. a German locale and then dies), the encoding, and
stderr (drained on a thread, so that when the JVM dies the error names the Java exception
instead of pycocoevalcap's ``could not convert string to float: b''``). Lines are written on
a writer thread while the caller reads the answers, so one process scores segments at the
speed of the JVM instead of one round trip per segment.
"""

from __future__ import annotations

import collections
import os
import shutil
import subprocess
import threading
import weakref
from pathlib import Path
from typing import Iterable, Sequence

from dvsa.errors import DvsaError

JAVA_MISSING = "Java not found: METEOR needs a Java runtime: apt-get install default-jre-headless"

# Forced for every JVM we start: a locale with decimal points and UTF-8 text on the pipes.
# Put after JAVA_TOOL_OPTIONS by the JVM, so they win over a user's locale settings there.
JVM_LOCALE_FLAGS = ("-Duser.language=en", "-Duser.country=US", "-Dfile.encoding=UTF-8")

_STDERR_LINES_KEPT = 200


def pycocoevalcap_dir() -> Path:
    """The installed pycocoevalcap package directory (it ships the METEOR and PTB jars)."""
    import pycocoevalcap.meteor.meteor as wrapper  # pycocoevalcap itself is a namespace package

    return Path(wrapper.__file__).resolve().parent.parent


def meteor_jar() -> Path:
    return pycocoevalcap_dir() / "meteor" / "meteor-1.5.jar"


def check_java(java: str = "java") -> str:
    """Return the path of the ``java`` executable, or raise :class:`DvsaError` naming the fix."""
    path = shutil.which(java)
    if path is None:
        raise DvsaError(JAVA_MISSING)
    return path


def java_env() -> dict[str, str]:
    """The environment for our JVMs: the caller's, with ``LC_ALL=C`` (decimal points)."""
    env = dict(os.environ)
    env["LC_ALL"] = "C"
    return env


def _terminate(proc: subprocess.Popen) -> None:
    """Close a METEOR process (finaliser: runs on close(), garbage collection or exit)."""
    if proc.poll() is None:
        try:
            proc.stdin.close()
        except OSError:
            pass
        try:
            proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for stream in (proc.stdout, proc.stderr):
        try:
            stream.close()
        except OSError:
            pass


class MeteorProcess:
    """One METEOR 1.5 JVM, started on first use and reused; thread-safe; ``close()`` ends it.

    ``java_options`` are appended after the forced flags (tests use them to break the JVM on
    purpose). If the JVM dies, the call raises :class:`DvsaError` with its exit code and the
    end of its stderr, and the next call starts a fresh JVM.
    """

    def __init__(self, java: str = "java", max_heap: str = "2G",
                 java_options: Sequence[str] = ()):
        self.java = java
        self.max_heap = max_heap
        self.java_options = tuple(java_options)
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self._stderr: collections.deque[str] = collections.deque(maxlen=_STDERR_LINES_KEPT)
        self._stderr_thread: threading.Thread | None = None
        self._finalizer: weakref.finalize | None = None

    # ------------------------------------------------------------------ lifecycle

    def command(self) -> list[str]:
        return [self.java, f"-Xmx{self.max_heap}", *JVM_LOCALE_FLAGS, *self.java_options,
                "-jar", str(meteor_jar()), "-", "-", "-stdio", "-l", "en", "-norm"]

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _ensure_started(self) -> subprocess.Popen:
        if self._proc is not None and self._proc.poll() is None:
            return self._proc
        self._discard()
        java = check_java(self.java)
        cmd = self.command()
        cmd[0] = java
        try:
            proc = subprocess.Popen(cmd, cwd=str(meteor_jar().parent), env=java_env(),
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE)
        except FileNotFoundError as exc:  # java vanished between which() and exec
            raise DvsaError(JAVA_MISSING) from exc
        self._stderr = collections.deque(maxlen=_STDERR_LINES_KEPT)
        self._stderr_thread = threading.Thread(target=self._drain_stderr,
                                               args=(proc.stderr, self._stderr),
                                               name="meteor-stderr", daemon=True)
        self._stderr_thread.start()
        self._finalizer = weakref.finalize(self, _terminate, proc)
        self._proc = proc
        return proc

    @staticmethod
    def _drain_stderr(stream, sink: collections.deque) -> None:
        for raw in iter(stream.readline, b""):
            sink.append(raw.decode("utf-8", "replace").rstrip())

    def _discard(self) -> None:
        if self._finalizer is not None:
            self._finalizer()  # terminates the process (idempotent)
        if self._stderr_thread is not None:
            self._stderr_thread.join(timeout=2)
        self._proc = None
        self._finalizer = None
        self._stderr_thread = None

    def close(self) -> None:
        """End the JVM (idempotent); a later call starts a new one."""
        with self._lock:
            self._discard()

    def __enter__(self) -> "MeteorProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ protocol

    def _died(self, proc: subprocess.Popen, doing: str, stdout: Sequence[str] = ()) -> DvsaError:
        try:
            code = proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait()
        if self._stderr_thread is not None:
            self._stderr_thread.join(timeout=5)
        lines = [*stdout, *proc.stdout.read().decode("utf-8", "replace").splitlines(),
                 *list(self._stderr)[-12:]]
        tail = " | ".join(line.strip() for line in lines if line.strip())
        self._discard()
        return DvsaError(f"METEOR's Java process died (exit code {code}) while {doing}: "
                         f"{tail or 'no output on stderr'}")

    def _exchange(self, lines: Iterable[str], n_answers: int, doing: str) -> list[str]:
        """Write ``lines`` on a thread, read ``n_answers`` lines back; JVM death -> DvsaError."""
        proc = self._ensure_started()
        write_error: list[BaseException] = []

        data = "".join(line + "\n" for line in lines).encode("utf-8")

        def writer() -> None:
            try:
                proc.stdin.write(data)
                proc.stdin.flush()
            except (BrokenPipeError, OSError, ValueError) as exc:  # JVM gone: reader reports
                write_error.append(exc)

        thread = threading.Thread(target=writer, name="meteor-writer", daemon=True)
        thread.start()
        answers = []
        for _ in range(n_answers):
            raw = proc.stdout.readline()
            if not raw:
                thread.join(timeout=5)
                raise self._died(proc, doing)
            answers.append(raw.decode("utf-8", "replace").strip())
        thread.join()
        if write_error:  # answers all came back, yet the pipe broke: treat as death
            raise self._died(proc, doing)
        return answers

    def segment_stats(self, segments: Sequence[tuple[Sequence[str], str]]) -> list[str]:
        """METEOR sufficient statistics, one line per ``(references, hypothesis)`` segment.

        Texts must already be sanitised (no newline, no ``|||``; see ``captions.prepare``).
        """
        for i, (refs, hyp) in enumerate(segments):
            if not refs:
                raise DvsaError(f"METEOR segment {i}: no reference caption")
            for text in (*refs, hyp):
                if "\n" in text or "\r" in text or "|||" in text:
                    raise DvsaError(f"METEOR segment {i}: text contains a newline or '|||' "
                                    f"(sanitise it first): {text[:80]!r}")
        lines = (" ||| ".join(("SCORE", " ||| ".join(refs), hyp)) for refs, hyp in segments)
        with self._lock:
            answers = self._exchange(lines, len(segments), "computing segment statistics")
            for i, answer in enumerate(answers):
                if not _is_number_line(answer):
                    self._raise_if_died(f"computing segment statistics ({answer!r})")
                    raise DvsaError(f"METEOR segment {i}: unexpected answer {answer[:120]!r}")
        return answers

    def _raise_if_died(self, doing: str) -> None:
        """After a garbled answer: if the JVM is exiting (it prints VM errors on stdout),
        report it as a death with its output."""
        proc = self._proc
        if proc is None:
            return
        try:
            proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            return
        raise self._died(proc, doing)

    def evaluate(self, stats: Sequence[str]) -> tuple[float, list[float]]:
        """Corpus METEOR from segments' statistics: ``(corpus score, per-segment scores)``.

        One ``EVAL`` line over all statistics, as pycocoevalcap's ``compute_score`` sends it:
        the corpus score comes from the summed statistics, not the mean of segment scores.
        """
        if not stats:
            raise DvsaError("METEOR: nothing to evaluate (no segment statistics)")
        line = "EVAL ||| " + " ||| ".join(stats)
        with self._lock:
            answers = self._exchange([line], len(stats) + 1, "evaluating the corpus score")
        try:
            values = [float(a) for a in answers]
        except ValueError as exc:
            raise DvsaError(f"METEOR: unexpected EVAL answer ({exc})") from exc
        return values[-1], values[:-1]


def _is_number_line(line: str) -> bool:
    parts = line.split()
    if not parts:
        return False
    try:
        for p in parts:
            float(p)
    except ValueError:
        return False
    return True
