"""Studies: a TOML plan of cells (settings of `python -m har_ref train`, or a zero-shot or linear-probe
baseline), each run once per seed into an ordinary run directory, then compared with one baseline.

    plan.py     the plan read and checked: every run's command line, before anything runs
    runner.py   the runs as subprocesses: finished ones skipped, killed ones resumed, N at a time
    report.py   study.json, report.md and its pictures: each cell against the baseline, with CIs
    claims.toml the shipped plan: the seed study's claims as experiments (`make study`)
"""
