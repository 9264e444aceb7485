"""The names of the filters every evaluation compares (``baselines``), in the order of every
table: importable without torch, so that reports and summaries can list them."""

FILTERS = ("none", "keyword", "safety_checker", "mhsc", "zero_shot", "espresso")
