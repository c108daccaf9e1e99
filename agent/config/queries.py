"""The ``detection.queries`` section: black-box query detection, per client, in the request path.

Every default is a bound or a threshold of agent/detect/queries/ (README.md, "Black-box query detection").
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from agent.config.base import Strict

QueryMode = Literal["off", "flag", "enforce"]
ClientIdentity = Literal["peer", "certificate", "metadata"]


class QueryDetection(Strict):
    """Black-box query detection (agent/detect/queries/): each client's recent ModelInfer inputs, kept as compact
    fingerprints; a client whose inputs are near-duplicates of its own earlier ones far more often than benign
    traffic is flagged.

    ``mode`` is every model's unless ``models.<name>.query_mode`` says otherwise: ``off``; ``flag`` (counted,
    logged, alerted on; the call goes on); ``enforce`` (as flag, and the client's calls to the model are refused
    with PERMISSION_DENIED for ``block_seconds``)."""

    mode: QueryMode = "off"
    # Who a client is: its address without the port ("peer"), the subject of its TLS client certificate
    # ("certificate": needs mutual TLS on the listener), or the value of the request metadata key
    # `identity_key` ("metadata": only worth trusting where a gateway in front sets it). A call without a
    # certificate or without the key falls back to its peer address.
    identity: ClientIdentity = "peer"
    identity_key: str = Field("x-client-id", min_length=1, max_length=128, pattern=r"^[0-9a-z_.-]+$")
    # Fingerprints: each input row quantised in steps of `quantization_step` (in the tensor's own units: 0.2 for
    # pixels in [0, 1], 51 for pixels in 0..255; models.<name>.query_quantization_step per model), every run of
    # `window` consecutive values hashed with a per-process secret key, and the `hashes` largest distinct hashes
    # kept. Two rows are near-duplicates when they share at least `match_threshold` of them; identical rows
    # (retries) are repeats and count for nothing.
    quantization_step: float = Field(0.2, gt=0)
    window: int = Field(50, ge=2, le=4096)
    hashes: int = Field(50, ge=4, le=256)
    match_threshold: int = Field(20, ge=1)
    # Per client: the fingerprints of its last `fingerprints_per_client` rows are compared with each new row; a
    # client is flagged when at least `near_duplicates_to_flag` of its last `history` rows (repeats not counted)
    # were near-duplicates of an earlier row.
    fingerprints_per_client: int = Field(32, ge=1, le=1024)
    history: int = Field(50, ge=1, le=1024)
    near_duplicates_to_flag: int = Field(10, ge=1)
    # Clients kept at once (least recently seen dropped first) and how long an idle one is kept.
    max_clients: int = Field(10_000, ge=1)
    client_idle_seconds: float = Field(1800.0, gt=0)
    # Enforce mode: a flagged client's calls to the model are refused this long.
    block_seconds: float = Field(600.0, gt=0)
    # Rows of one request fingerprinted, at most (its first ones); the rest go unchecked and are counted.
    max_rows_per_request: int = Field(64, ge=1)

    @model_validator(mode="after")
    def _consistent(self) -> "QueryDetection":
        if self.match_threshold > self.hashes:
            raise ValueError("match_threshold must be at most hashes (the hashes two rows can share)")
        if self.near_duplicates_to_flag > self.history:
            raise ValueError("near_duplicates_to_flag must be at most history (the rows it is counted over)")
        if self.client_idle_seconds < self.block_seconds:
            raise ValueError("client_idle_seconds must be at least block_seconds (a blocked client is not forgotten "
                             "before its block ends)")
        return self
