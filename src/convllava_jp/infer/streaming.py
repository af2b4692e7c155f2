"""`VLMPipeline.stream`: transformers' `generate` in a thread of its own, text pieces as they come.

The thread also encodes the request (the image's preprocessing), with the caller's torch thread
count: the caller's thread runs no parallel op and so holds no OpenMP team beside the generating
one (compute_threads.py). The caller's side turns ids into text (`IncrementalDecoder`) and stops
at an end-of-turn id or a stop string; leaving its loop early stops the generation after one step.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator

import torch

from .compute_threads import set_intra_op_threads
from .decoding import IncrementalDecoder


class _TokenQueueStreamer:
    """A transformers streamer that hands generated ids (not the prompt) to a queue; None ends."""

    def __init__(self, out: queue.Queue):
        self.out = out
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        for token in value.reshape(-1).tolist():
            self.out.put(token)

    def end(self) -> None:
        self.out.put(None)


def stream_pieces(pipeline, request, config) -> Iterator[str]:
    """Text pieces of `pipeline`'s answer to `request` under a validated `config`."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    threads = torch.get_num_threads()
    tokens: queue.Queue = queue.Queue()
    cancel = threading.Event()
    errors: list[BaseException] = []

    class _Cancelled(StoppingCriteria):
        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
            return torch.full(
                (input_ids.shape[0],), cancel.is_set(), dtype=torch.bool, device=input_ids.device
            )

    def work() -> None:
        streamer = _TokenQueueStreamer(tokens)
        try:
            set_intra_op_threads(threads)
            encoded = pipeline.encode(request)
            pipeline.check_fits(encoded, config)
            inputs = pipeline.batch_inputs([encoded])
            with torch.inference_mode(), pipeline.lock:
                if config.seed is not None:
                    torch.manual_seed(config.seed)
                pipeline.model.generate(
                    **inputs,
                    **pipeline._hf_kwargs(config),
                    streamer=streamer,
                    stopping_criteria=StoppingCriteriaList([_Cancelled()]),
                )
        except BaseException as err:  # surfaced to the consumer below
            errors.append(err)
            tokens.put(None)

    thread = threading.Thread(target=work, name="vlm-stream", daemon=True)
    thread.start()
    decoder = IncrementalDecoder(pipeline.tokenizer, config.stop, pipeline.byte_ids)
    stops = set(pipeline.stop_token_ids)
    try:
        while (token := tokens.get()) is not None:
            if token in stops:
                break
            piece = decoder.add(token)
            if piece:
                yield piece
            if decoder.stopped:
                break
        piece = decoder.finish()
        if piece:
            yield piece
    finally:
        cancel.set()
        thread.join()
    if errors:
        raise errors[0]
