"""vLLM's console chatter is routed: warnings (minus the known-harmless rotary reload
warning) on the console, everything in the run's log file, whether vLLM propagates to the
root logger (the trainer's set-up) or was configured with its own handler beforehand."""

from __future__ import annotations

import io
import logging

import pytest

from grpo_lab.rollout.backends.vllm import route_engine_logs


@pytest.fixture()
def loggers(tmp_path):
    engine, root = logging.getLogger("vllm"), logging.getLogger()
    saved = (engine.handlers[:], engine.level, engine.propagate, root.handlers[:], root.level)
    console_stream = io.StringIO()
    console = logging.StreamHandler(console_stream)
    log_file = logging.FileHandler(tmp_path / "train.log")  # what Hydra sets up for the run
    root.setLevel(logging.INFO)
    yield engine, root, console, console_stream, log_file, tmp_path / "train.log"
    for h in (console, log_file):
        root.removeHandler(h)
    log_file.close()
    engine.handlers, engine.level, engine.propagate = saved[0], saved[1], saved[2]
    root.setLevel(saved[4])


def emit_and_read(console_stream, log_file, path):
    child = logging.getLogger("vllm.model_executor")
    child.info("Reloading weights inplace...")
    child.warning("RotaryEmbedding: Failed to load weights")
    child.warning("QKVParallelLinear: Failed to load weights")
    logging.getLogger("grpo_lab").info("output directory: x")  # our own INFO is untouched
    log_file.flush()
    return console_stream.getvalue(), path.read_text()


def check(shown, kept):
    assert "Reloading weights" not in shown and "RotaryEmbedding" not in shown
    assert "QKVParallelLinear: Failed to load weights" in shown  # a real failure still shows
    assert "output directory" in shown
    assert kept.count("Reloading weights inplace") == 1 and "RotaryEmbedding" in kept and "QKVParallelLinear" in kept


def test_propagating_engine_records_are_filtered_on_the_console_only(loggers):
    engine, root, console, stream, log_file, path = loggers
    engine.handlers, engine.propagate = [], True  # VLLM_CONFIGURE_LOGGING=0
    engine.setLevel(logging.NOTSET)
    root.addHandler(console)
    root.addHandler(log_file)
    route_engine_logs("WARNING")
    route_engine_logs("WARNING")  # idempotent: no second filter
    assert sum(type(f).__name__ == "_EngineConsoleFilter" for f in console.filters) == 1
    check(*emit_and_read(stream, log_file, path))


def test_an_engine_with_its_own_console_handler_is_routed_too(loggers):
    engine, root, console, stream, log_file, path = loggers
    engine.handlers, engine.propagate = [console], False  # vLLM configured its logging first
    engine.setLevel(logging.INFO)
    root.addHandler(log_file)
    own_console = logging.StreamHandler(io.StringIO())
    root.addHandler(own_console)  # the run's console for our own records
    route_engine_logs("WARNING")
    shown, kept = emit_and_read(stream, log_file, path)
    assert "Reloading weights" not in shown and "RotaryEmbedding" not in shown and "QKVParallelLinear" in shown
    assert kept.count("Reloading weights inplace") == 1 and "RotaryEmbedding" in kept
    root.removeHandler(own_console)


def test_unknown_level_is_refused():
    with pytest.raises(ValueError, match="'LOUD'"):
        route_engine_logs("LOUD")


def test_debug_console_level_lets_debug_records_through(loggers):
    engine, root, console, stream, log_file, path = loggers
    engine.handlers, engine.propagate = [], True
    engine.setLevel(logging.NOTSET)
    root.setLevel(logging.DEBUG)
    root.addHandler(console)
    route_engine_logs("DEBUG")
    logging.getLogger("vllm.core").debug("scheduler detail")
    assert "scheduler detail" in stream.getvalue()
