"""Frames per second of a served model at several requests in flight, and of the local
engine at several frames per batch, on the same images with the same instruction
(``tools/benchmark.py --server``).

A run sends every image once: with ``in_flight`` k, k threads each send their next image as
soon as their last answer came (k cameras, or k robots, sharing the server). Latency is each
request's own time; frames/s is the images over the run's wall time. A failed request fails
the run (no figure is reported over a part of the frames).
"""
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import List, Sequence, Tuple


@dataclass
class RunFigures:
    backend: str
    """'openai' (the served model) or 'local'."""
    concurrency: int
    """Requests in flight ('openai') or frames per batch ('local')."""
    frames: int
    seconds: float
    frames_per_s: float
    latency_ms_mean: float
    latency_ms_p50: float
    latency_ms_max: float
    tokens_mean: float
    """Generated tokens per answer (their count sets the time)."""

    def to_dict(self) -> dict:
        return asdict(self)


def _figures(backend, concurrency, latencies, tokens, seconds) -> RunFigures:
    milliseconds = [value * 1000.0 for value in latencies]
    return RunFigures(backend=backend, concurrency=concurrency, frames=len(latencies),
                      seconds=round(seconds, 3), frames_per_s=round(len(latencies) / seconds, 3),
                      latency_ms_mean=round(statistics.fmean(milliseconds), 1),
                      latency_ms_p50=round(statistics.median(milliseconds), 1),
                      latency_ms_max=round(max(milliseconds), 1),
                      tokens_mean=round(statistics.fmean(tokens), 1))


def time_served(engine, images: Sequence, instruction: str, max_new_tokens: int,
                in_flight: int) -> Tuple[RunFigures, List[str]]:
    """Every image through ``engine.answer`` (an :class:`~.openai_engine.OpenAIEngine`),
    ``in_flight`` at a time; the figures and each image's answer text."""
    def one(image):
        started = time.perf_counter()
        answer = engine.answer(image, instruction, max_new_tokens)
        return time.perf_counter() - started, answer.generation

    started = time.perf_counter()
    with ThreadPoolExecutor(in_flight) as pool:
        results = list(pool.map(one, images))  # the first failure is raised here
    seconds = time.perf_counter() - started
    figures = _figures('openai', in_flight, [latency for latency, _ in results],
                       [len(g.token_probs) for _, g in results], seconds)
    return figures, [generation.text for _, generation in results]


def time_local(engine, images: Sequence, instruction: str, max_new_tokens: int,
               batch: int) -> Tuple[RunFigures, List[str]]:
    """Every image through the local engine's ``generate``, ``batch`` frames at a time (a
    frame's latency is its batch's)."""
    latencies, tokens, texts = [], [], []
    started = time.perf_counter()
    for start in range(0, len(images), batch):
        chunk = list(images[start:start + batch])
        batch_started = time.perf_counter()
        generations = engine.generate(chunk, instruction, max_new_tokens)
        latency = time.perf_counter() - batch_started
        latencies += [latency] * len(chunk)
        tokens += [len(g.token_ids) for g in generations]
        texts += [g.text for g in generations]
    seconds = time.perf_counter() - started
    return _figures('local', batch, latencies, tokens, seconds), texts
