"""``trifuse synth``: the synthetic BraTS-like cohort."""
from __future__ import annotations

from lightning_app.stages import progress


def run(args) -> int:
    from trifuse.io.nifti import sweep_dead_temps
    from trifuse.synth import synthesize_cohort

    sweep_dead_temps(args.out)  # case folders a killed run left half-written (hidden, never read)
    out = synthesize_cohort(args.out, args.n, seed=args.seed, layout=args.layout, size=args.size, progress=progress("synth"))
    print(f"synthetic cohort: {len(out)} case(s) in {args.out} (BraTS {args.layout} layout, size {args.size})")
    return 0


def register(sub) -> None:
    s = sub.add_parser("synth", help="write a synthetic BraTS-like cohort on MNI152 anatomy")
    s.add_argument("--out", "--data", dest="out", default="data/synthetic", help="output dataset folder")
    s.add_argument("--n", type=int, default=16, help="number of cases")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--layout", type=int, choices=(2020, 2021, 2023), default=2021, help="BraTS naming and label convention")
    s.add_argument("--size", choices=("full", "small", "tiny"), default="small", help="full: 240x240x155 @1 mm; small: 120x120x78 @2 mm; tiny: 60x60x39 @4 mm")
    s.set_defaults(func=run)
