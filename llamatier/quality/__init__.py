"""KV cache types' accuracy cost, measured in real llama.cpp runs against f16/f16.

``measure_quality(model, "f16,q8_0,q4_0/f16")`` runs llama.cpp teacher-forced once
per K/V pair; ``save_quality`` writes Parquet + JSON; ``lookup_quality(file, k, v)``
returns one pair's measured row for other tools (replay) to show beside the saving.

``measure_eviction(model, trace, "h2o,streaming", [8, 16])`` measures what dropping
KV blocks costs: the trace's tokens teacher-forced with the positions an eviction
policy drops removed from llama.cpp's KV cache (``plan_eviction`` gives them from
a sparse replay); ``save_eviction`` writes Parquet + JSON.
"""

from llamatier.quality.eviction import EvictionResult, EvictionRow, measure_eviction
from llamatier.quality.inputs import (
    DEFAULT_TEXT_NAME,
    check_pair_fits,
    default_text,
    pair_storage,
    parse_kv_pairs,
    read_text_file,
)
from llamatier.quality.measure import QualityResult, QualityRow, measure_quality
from llamatier.quality.plan import EvictionPlan, plan_eviction
from llamatier.quality.proxy import proxy_correlation, spearman
from llamatier.quality.store import (
    LOOKUP_KEYS,
    eviction_to_dict,
    load_eviction_rows,
    load_quality_rows,
    lookup_quality,
    result_to_dict,
    save_eviction,
    save_quality,
)

__all__ = [
    "DEFAULT_TEXT_NAME",
    "LOOKUP_KEYS",
    "EvictionPlan",
    "EvictionResult",
    "EvictionRow",
    "QualityResult",
    "QualityRow",
    "check_pair_fits",
    "default_text",
    "eviction_to_dict",
    "load_eviction_rows",
    "load_quality_rows",
    "lookup_quality",
    "measure_eviction",
    "measure_quality",
    "pair_storage",
    "parse_kv_pairs",
    "plan_eviction",
    "proxy_correlation",
    "read_text_file",
    "result_to_dict",
    "save_eviction",
    "save_quality",
    "spearman",
]
