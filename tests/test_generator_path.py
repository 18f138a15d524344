"""The Generator path (what TensorRT-LLM builds run through) against the Decoder path, on real models.

`DecoderAsGenerator` implements the Generator contract over a real decoder (torch or ONNX
Runtime): the prompt goes in as ids with image rows as prompt-table ids counted across the
batch (TensorRT-LLM's Python-session layout, `batch_table_inputs`), the table is looked up here,
and greedy tokens come out step by step, the end id included. It is not TensorRT-LLM and these
tests claim nothing about it. What they check is our side of the contract, end to end:
- `Pipeline.prepare` making TablePrompts;
- `stream_generated`'s text, stop strings and finish reasons;
- the serving engine's static batches;
- teacher-forced metrics from context logits;
each giving what the Decoder path gives on the same model.
"""

from __future__ import annotations

import numpy as np
import pytest

from convllava_export.engines.tensorrt_llm import batch_table_inputs, new_token_budget
from convllava_export.runtime.serving_loop import LoopSettings, ServingLoop
from convllava_export.runtime.generation import TablePrompt, Timings
from convllava_export.runtime.pipeline import Pipeline
from convllava_export.runtime.sampling import SamplingParams
from convllava_export.validation.metrics import teacher_forced_logits

from test_engine import Collector, pipeline_for, requests


class DecoderAsGenerator:
    runs_own_loop = True

    def __init__(self, decoder, table_base: int, max_input: int = 4096) -> None:
        self.decoder, self.vocab_size, self.table_base, self.max_input = decoder, decoder.vocab_size, table_base, max_input
        self.batches: list[int] = []

    def check(self, prompt):
        new_token_budget([prompt.length], 1, self.max_input, self.max_input + 64)  # TrtLlmGenerator's rule for its input

    def _embeds(self, ids: list[int], table: np.ndarray | None) -> np.ndarray:
        ids_a = np.asarray(ids)
        text = ids_a < self.table_base
        out = np.empty((len(ids_a), self.decoder.embed(ids_a[:1]).shape[-1]), np.float32)
        out[text] = self.decoder.embed(ids_a[text])
        if (~text).any():
            out[~text] = table[ids_a[~text] - self.table_base]
        return out

    def stream(self, prompts, params, end_id):
        assert params.temperature == 0, "greedy only"
        ids, table = batch_table_inputs(prompts, self.table_base)
        self.batches.append(len(prompts))
        states = [self.decoder.extend(self._embeds(i, table)) for i in ids]
        generated, done = [0] * len(prompts), [False] * len(prompts)
        while not all(done):
            step = [[] for _ in prompts]
            for i, (logits, kv) in enumerate(states):
                if done[i]:
                    continue
                tok = int(np.argmax(logits))
                step[i] = [tok]
                generated[i] += 1
                done[i] = (tok == end_id and not params.ignore_eos) or generated[i] >= params.max_new_tokens
                if not done[i]:
                    states[i] = self.decoder.extend(self.decoder.embed(np.array([tok])), kv)
            yield step

    def context_logits(self, prompt):
        ids, table = batch_table_inputs([prompt], self.table_base)
        embeds = self._embeds(ids[0], table)
        rows, kv = [], None
        for k in range(len(embeds)):
            logits, kv = self.decoder.extend(embeds[k : k + 1], kv)
            rows.append(logits)
        return np.stack(rows)


def generator_twin(pipe: Pipeline, table_base: int = 1024) -> Pipeline:
    """The same model as `pipe`, its LLM behind the Generator contract (table ids from 1024,
    past the vocabulary, as ModelOpt pads it for int4-awq)."""
    twin = Pipeline(pipe.vision, DecoderAsGenerator(pipe.decoder, table_base), pipe.tokenizer, pipe.preprocess_cfg, dict(pipe.info))
    twin.max_context = pipe.max_context
    return twin


@pytest.mark.parametrize("kind", ["torch", "dynamo"])
def test_generator_path_gives_the_decoder_paths_tokens(kind, reference, conformance, request):
    pipe = pipeline_for(kind, reference, request)
    twin = generator_twin(pipe)
    reqs = requests(conformance)  # one, none and two images per prompt, in one batch
    params = SamplingParams(max_new_tokens=12)
    want = pipe.generate_batch(reqs, params)
    got = twin.generate_batch(reqs, params)
    assert [g.token_ids for g in got] == [w.token_ids for w in want]
    assert [g.text for g in got] == [w.text for w in want] and [g.finish_reason for g in got] == [w.finish_reason for w in want]
    assert twin.decoder.batches == [len(reqs)]
    # streamed, with a stop string: the same events
    stop = SamplingParams(max_new_tokens=12, stop=(want[0].text.strip()[:3],)) if want[0].text.strip() else params
    a = [(e.index, e.token_id, e.text, e.finish_reason) for e in pipe.stream(reqs[:2], stop)]
    b = [(e.index, e.token_id, e.text, e.finish_reason) for e in twin.stream(reqs[:2], stop)]
    assert sorted(a) == sorted(b)


def test_teacher_forced_logits_from_context_logits_match(reference, conformance, request):
    pipe = pipeline_for("torch", reference, request)
    twin = generator_twin(pipe)
    req = requests(conformance)[2]  # two images
    answer = pipe.generate_batch([req], SamplingParams(max_new_tokens=6, ignore_eos=True))[0].token_ids
    seq = pipe.prepare(req, Timings())
    prompt = twin.prepare(req, Timings())
    assert isinstance(prompt, TablePrompt) and prompt.length == len(seq)
    np.testing.assert_allclose(teacher_forced_logits(twin.decoder, prompt, answer), teacher_forced_logits(pipe.decoder, seq, answer), atol=2e-4)


def test_serving_engine_batches_generator_requests(reference, conformance, request):
    pipe = pipeline_for("dynamo", reference, request)
    twin = generator_twin(pipe)
    reqs = requests(conformance)
    params = [SamplingParams(max_new_tokens=n, ignore_eos=True) for n in (4, 9, 6, 12, 3)]
    want = [pipe.generate_batch([r], p)[0].token_ids for r, p in zip(reqs, params)]
    engine = ServingLoop(twin, LoopSettings(max_running=8))
    collectors = [Collector() for _ in reqs]
    for r, p, c in zip(reqs, params, collectors):
        engine.submit(r, p, c)
    done = [c.wait() for c in collectors]
    engine.close()
    assert [c.tokens for c in collectors] == want  # each stops at its own max_tokens within a shared batch
    assert [d.completion_tokens for d in done] == [p.max_new_tokens for p in params]
    assert [d.prompt_tokens for d in done] == [len(pipe.prepare(r, Timings())) for r in reqs]
    assert max(twin.decoder.batches) >= 2  # requests really shared an engine batch


def test_a_request_beyond_the_engine_fails_alone(reference, conformance, request):
    from convllava_export.errors import ConvLlavaError

    pipe = pipeline_for("dynamo", reference, request)
    reqs = requests(conformance)
    lengths = [len(pipe.prepare(r, Timings())) for r in reqs]
    twin = generator_twin(pipe)
    twin.decoder.max_input = sorted(lengths)[-2]  # the longest prompt no longer fits the "engine"
    params = SamplingParams(max_new_tokens=5, ignore_eos=True)
    engine = ServingLoop(twin, LoopSettings(max_running=8))
    collectors = [Collector() for _ in reqs]
    for r, c in zip(reqs, collectors):
        engine.submit(r, params, c)
    longest = int(np.argmax(lengths))
    for i, c in enumerate(collectors):
        if i == longest:
            with pytest.raises(ConvLlavaError, match="the engine takes at most"):
                c.wait()
        else:
            assert c.wait().completion_tokens == 5
    engine.close()
