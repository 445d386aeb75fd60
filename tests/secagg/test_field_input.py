"""Field-word inputs (already encoded, e.g. the distributed discrete Gaussian) through real SecAgg+."""

from __future__ import annotations

import numpy as np
import pytest

from fedpeft.secagg.client import SecAggClient
from fedpeft.secagg.config import SecAggConfig
from fedpeft.secagg.driver import run_in_memory
from fedpeft.secagg.errors import StageError, UpdateError
from fedpeft.secagg.quantize import decode_signed, encode_signed
from fedpeft.secagg.stages import Stage

SESSION = b"field-input-test-session"


def _signed_inputs(n: int, length: int, bits: int, seed: int) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    bound = (1 << (bits - 1)) // (2 * n)
    return {cid: rng.integers(-bound, bound, size=length) for cid in range(1, n + 1)}


@pytest.mark.parametrize("bits", [16, 20, 32])
def test_exact_integer_sum_of_field_words_with_dropout(bits: int) -> None:
    cfg = SecAggConfig(clip=1.0, bits=bits, expected_dropout=0.1, max_abort_prob=0.5)
    signed = _signed_inputs(8, 257, bits, bits)
    words = {cid: encode_signed(v, bits) for cid, v in signed.items()}
    run = run_in_memory(cfg.resolve(8), words, session_id=SESSION,
                        dropouts={Stage.COLLECT_MASKED: {3}}, field_inputs=True)
    survivors = run.result.survivors
    assert 3 not in survivors and len(survivors) == 7
    expected = sum(signed[c] for c in survivors)
    np.testing.assert_array_equal(decode_signed(run.result.modular_sum, bits), expected)


def test_field_input_checks_length_range_and_stage() -> None:
    cfg = SecAggConfig(clip=1.0, bits=16, max_abort_prob=1.0).resolve(3)
    client = SecAggClient(1, SESSION, cfg, expected_vector_length=4)
    with pytest.raises(StageError, match="after SETUP"):
        client.set_field_input(np.zeros(4, dtype=np.uint32))
    from fedpeft.secagg.server import SecAggServer

    server = SecAggServer(cfg, [1, 2, 3], 4, SESSION)
    client.handle(server.start()[1])
    assert client.round_setup.bits == 16
    with pytest.raises(UpdateError, match="2\\^bits=16"):
        client.set_field_input(np.array([0, 1, 2, 1 << 16], dtype=np.uint32))
    with pytest.raises(UpdateError, match="length 4"):
        client.set_field_input(np.zeros(5, dtype=np.uint32))
    with pytest.raises(UpdateError, match="uint32"):
        client.set_field_input(np.zeros(4, dtype=np.int64))  # type: ignore[arg-type]


def test_field_words_survive_state_export() -> None:
    cfg = SecAggConfig(clip=1.0, bits=20, max_abort_prob=1.0).resolve(3)
    from fedpeft.secagg.server import SecAggServer

    server = SecAggServer(cfg, [1, 2, 3], 6, SESSION)
    client = SecAggClient(2, SESSION, cfg, expected_vector_length=6)
    client.handle(server.start()[2])
    words = np.array([0, 5, (1 << 20) - 1, 7, 9, 11], dtype=np.uint32)
    client.set_field_input(words)
    again = SecAggClient.import_state(client.export_state(), cfg)
    assert again._update is not None and again._update.dtype == np.uint32
    np.testing.assert_array_equal(again._update, words)
