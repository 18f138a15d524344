"""The serving engine: a request's greedy tokens are the same alone or joining a batch mid-flight,
for every decoder backend; cancelled sequences leave; encoder cache and prefix reuse."""

from __future__ import annotations

import queue
import threading
import time

import pytest
from PIL import Image

from convllava_export.model.reference import TorchDecoder
from convllava_export.preprocess import PreprocessConfig
from convllava_export.prompt import Conversation
from convllava_export.runtime.serving_loop import Finished, LoopSettings, QueueFull, ServingLoop
from convllava_export.runtime.generation import TokenEvent
from convllava_export.model.reference import TorchVision
from convllava_export.runtime.pipeline import Pipeline, Request
from convllava_export.runtime.sampling import SamplingParams

from conftest import require

BACKENDS = ["torch", "dynamo", "gqa"]
GREEDY = SamplingParams(max_new_tokens=20, ignore_eos=True)


def pipeline_for(kind: str, reference, request, mode: str = "pad") -> Pipeline:
    from convllava_export.engines.onnxruntime import open_decoder

    if kind == "torch":
        decoder = TorchDecoder(reference)
    elif kind == "gqa":
        require("onnxruntime_genai", "genai")
        decoder = open_decoder(request.getfixturevalue("conformance_gqa"))
    else:
        decoder = open_decoder(request.getfixturevalue("conformance_decoder"))
    cfg = PreprocessConfig.from_preprocessor_config(reference.info.preprocessor_config, mode=mode)
    pipe = Pipeline(TorchVision(reference), decoder, reference.tokenizer, cfg, {"max_images": 4})
    pipe.max_context = 4096
    return pipe


def images(conformance) -> dict[str, Image.Image]:
    return {p.stem: Image.open(p).convert("RGB") for p in sorted((conformance / "images").glob("*.png"))}


def requests(conformance) -> list[Request]:
    im = images(conformance)
    return [
        Request("What is shown in this image?", [im["wide_512x192"]]),
        Request("Describe it.", []),
        Request("Compare the two pictures, please, in some detail.", [im["tall_160x448"], im["small_100x60"]]),
        Request("What colour dominates?", [im["square_256x256"]]),
        Request("And this one, briefly?", [im["wide_512x192"], im["wide_512x192"]]),
    ]


class Collector:
    """Events of one request, gathered from the engine's threads."""

    def __init__(self) -> None:
        self.q: queue.Queue = queue.Queue()
        self.tokens: list[int] = []

    def __call__(self, item) -> None:
        self.q.put(item)

    def wait(self, n_tokens: int | None = None, timeout: float = 120) -> Finished | None:
        deadline = time.time() + timeout
        while True:
            item = self.q.get(timeout=max(0.01, deadline - time.time()))
            if isinstance(item, BaseException):
                raise item
            if isinstance(item, TokenEvent):
                self.tokens.append(item.token_id)
                if n_tokens is not None and len(self.tokens) >= n_tokens:
                    return None
            if isinstance(item, Finished):
                return item


def count_vision_calls(pipe: Pipeline) -> list[int]:
    """Images per vision-engine call, recorded as the engine makes them."""
    calls: list[int] = []
    real = pipe.vision.encode
    pipe.vision.encode = lambda px: calls.append(len(px)) or real(px)
    return calls


def run_alone(pipe: Pipeline, reqs: list[Request], params: SamplingParams) -> list[list[int]]:
    engine = ServingLoop(pipe, LoopSettings(max_running=1, prefix_cache_mb=0, encoder_cache_mb=0))
    out = []
    for r in reqs:
        c = Collector()
        engine.submit(r, params, c)
        c.wait()
        out.append(c.tokens)
    engine.close()
    return out


@pytest.mark.parametrize("kind", BACKENDS)
@pytest.mark.parametrize("mode", ["pad", "native"])
def test_tokens_equal_alone_and_joining_mid_flight(kind, mode, reference, conformance, request):
    pipe = pipeline_for(kind, reference, request, mode)
    reqs = requests(conformance)
    alone = run_alone(pipe, reqs, GREEDY)
    # the static-batch path (Pipeline.generate_batch) agrees with the engine run alone
    assert [r.token_ids for r in pipe.generate_batch(reqs[:2], GREEDY)] == alone[:2]
    engine = ServingLoop(pipe, LoopSettings(max_running=8, max_batched_tokens=16))  # prefill in chunks of 16
    first = Collector()
    engine.submit(reqs[0], GREEDY, first)
    first.wait(n_tokens=3)  # the others join while it decodes
    rest = [Collector() for _ in reqs[1:]]
    for r, c in zip(reqs[1:], rest):
        engine.submit(r, GREEDY, c)
    done = [first.wait(), *[c.wait() for c in rest]]
    assert [c.tokens for c in [first, *rest]] == alone
    assert max(engine.stats.batch_sizes) >= 3  # they really decoded together
    assert all(d.completion_tokens == GREEDY.max_new_tokens for d in done)
    engine.close()


def test_cancelled_sequence_leaves_the_batch(reference, conformance, request):
    pipe = pipeline_for("dynamo", reference, request)
    reqs = requests(conformance)
    long = SamplingParams(max_new_tokens=400, ignore_eos=True)
    alone = run_alone(pipe, reqs[:1], GREEDY)[0]
    engine = ServingLoop(pipe, LoopSettings(max_running=4))
    gone, stays = Collector(), Collector()
    handle = engine.submit(reqs[3], long, gone)
    gone.wait(n_tokens=2)
    engine.submit(reqs[0], GREEDY, stays)
    handle.cancel()
    emitted_at_cancel = len(gone.tokens) + gone.q.qsize()  # every event `gone` had received by now
    done = stays.wait()
    assert stays.tokens == alone and done.completion_tokens == GREEDY.max_new_tokens
    deadline = time.time() + 10
    while engine.stats.running and time.time() < deadline:
        time.sleep(0.01)
    assert engine.stats.running == 0
    after = list(gone.q.queue)  # what reached `gone` after wait() stopped reading it
    emitted = len(gone.tokens) + sum(isinstance(i, TokenEvent) for i in after)
    # dropped at the next step: at most the one token of the step in flight at cancel() (not
    # one more per step while `stays` decoded its 20), never finished and never failed
    assert emitted <= emitted_at_cancel + 1, (emitted, emitted_at_cancel)
    assert all(isinstance(i, TokenEvent) for i in after), after
    engine.close()


def test_encoder_cache_and_prefix_reuse(reference, conformance, request):
    pipe = pipeline_for("dynamo", reference, request)
    calls = count_vision_calls(pipe)
    im = images(conformance)["tall_160x448"]
    engine = ServingLoop(pipe, LoopSettings(max_running=4))
    turn1 = Conversation()
    turn1.add_user("What is shown in this image?", num_images=1)
    turn1.add_assistant(None)
    c1 = Collector()
    engine.submit(Request(turn1, [im]), SamplingParams(max_new_tokens=24), c1)
    d1 = c1.wait()
    answer = pipe.tokenizer.decode(c1.tokens, skip_special_tokens=True)
    turn2 = Conversation()
    turn2.add_user("What is shown in this image?", num_images=1)
    turn2.add_assistant(answer)
    turn2.add_user("Is it tall or wide?")
    turn2.add_assistant(None)
    c2 = Collector()
    engine.submit(Request(turn2, [im]), GREEDY, c2)
    d2 = c2.wait()
    assert sum(calls) == 1 and engine.stats.encoder_hits == 1  # the image was encoded once
    assert d1.cached_prompt_tokens == 0 and d2.cached_prompt_tokens >= d1.prompt_tokens  # turn 1 and its answer reused
    assert run_alone(pipe, [Request(turn2, [im])], GREEDY)[0] == c2.tokens  # same tokens without any cache
    engine.close()


def test_bad_request_fails_alone_and_queue_bound(reference, conformance, request):
    pipe = pipeline_for("dynamo", reference, request)
    pipe.max_context = 80
    engine = ServingLoop(pipe, LoopSettings(max_running=1, max_waiting=0))
    bad = Collector()
    engine.submit(Request("word " * 200, []), GREEDY, bad)
    with pytest.raises(Exception, match="above the model's context"):
        bad.wait()
    ok = Collector()
    engine.submit(Request("Describe it.", []), SamplingParams(max_new_tokens=200, ignore_eos=True), ok)
    with pytest.raises(QueueFull):
        for _ in range(3):
            engine.submit(Request("Describe it.", []), GREEDY, Collector())
    ok.wait()
    engine.close()


def test_threads_are_named_and_stop(reference, conformance, request):
    pipe = pipeline_for("torch", reference, request)
    before = set(threading.enumerate())
    engine = ServingLoop(pipe)
    started = set(threading.enumerate()) - before  # every thread the engine started, listed or not
    assert started == set(engine.threads)
    assert sorted(t.name for t in started) == ["convllava-encoder", "convllava-scheduler"]
    assert all(t.is_alive() for t in started) and engine.healthy
    engine.close()
    for t in started:
        t.join(5)  # hang guard: close() already waited for them
    assert [t.name for t in started if t.is_alive()] == []
    assert not engine.healthy


def test_no_encoder_cache_encodes_each_image_once(reference, conformance, request):
    """With the cache off (0 MB) an image is still encoded once per request, and a repeated
    image inside one batch once per batch."""
    pipe = pipeline_for("dynamo", reference, request)
    calls = count_vision_calls(pipe)
    im = images(conformance)["wide_512x192"]
    engine = ServingLoop(pipe, LoopSettings(encoder_cache_mb=0))
    c = Collector()
    engine.submit(Request("Compare.", [im, im]), SamplingParams(max_new_tokens=2), c)
    c.wait()
    assert sum(calls) == 1 and engine.stats.encoder_misses == 1 and engine.stats.encoder_hits == 1
    engine.close()
