"""Shared by the GPU A/B scripts: write the record as JSON, then print each variant's timings
over the rounds and its best against the baseline variant's best."""
import json


def save_and_print(path: str, record: dict, per_key: dict, title: str, base: str, width: int = 38,
                   digits: int = 1) -> None:
    """per_key: key -> variant name -> [timing a round]; base: the variant the ratio is against."""
    with open(path, "w") as f:
        json.dump(record, f, indent=1)
    print(f"\n== {title} ==")
    for key, per in per_key.items():
        best = min(per[base])
        for name, v in per.items():
            times = " / ".join(f"{x:.{digits}f}" for x in v)
            print(f"{key:8s} {name:{width}s} {times:>22s}  best vs {base} {min(v) / best:.4f}")
