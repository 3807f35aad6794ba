"""Hugging Face architectures in a plain loop, round 15: causal LMs not covered before: Helium, GLM (partial
rotary embeddings on interleaved pairs), VaultGemma, Seed-OSS, ERNIE 4.5, MiniCPM3 (latent attention), Zamba
(Mamba layers with a shared attention block) and xLSTM (its recurrent kernel, and its chunkwise kernel's refusal).

tests/_zoo9_kit.py trains each tiny float64 model (dropout 0.1 wherever the config has it) for 3 AdamW steps in a
plain loop and checks the replica against the trained model in evaluation mode, the residual share and
``keep=("train",)`` against the slow float64 loop reference (cases in tests/_zoo15_cases.py). All of them compute
their RMS norms (xLSTM also its states) in float32 whatever their dtype: their training gradients round there
(``assert_float32_exact``).
"""

from __future__ import annotations

import pytest
from _zoo9_kit import assert_float32_exact, run
from _zoo15_cases import CASES

from explaind.exceptions import UnsupportedModelError

pytest.importorskip("transformers")  # in the dev extra

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore::UserWarning:transformers")]


@pytest.mark.parametrize("name", ["helium", "glm_partial_rotary", "vaultgemma", "seed_oss", "ernie4_5", "minicpm3_mla",
                                  "zamba", "xlstm_recurrent"])
def test_causal_lms_with_float32_norms_are_exact_to_their_rounding(name):
    assert_float32_exact(run(CASES[name]))


def test_xlstm_refusal_names_the_line_that_writes_into_its_own_buffer():
    """xLSTM's chunkwise mLSTM kernel assembles its chunk states by writing into tensors it created
    (``matC_states[:, :, ...] = matC_k``), which vmap cannot run. The refusal named the pattern and the fix but not
    where the model does it; it now ends with the model's own line."""
    with pytest.raises(UnsupportedModelError, match=r"in place .* The call: mlstm_chunkwise_recurrent_fw_C, "
                                                    r".*modeling_xlstm\.py:\d+: matC_states\["):
        run(CASES["xlstm"], reference=False)
