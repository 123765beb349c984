"""`make bench`: speed and memory measured side by side with a baseline in the same run.

Each scenario returns rows of (ours, baseline, ratio, goal); the harness prints a table,
writes bench/results.json and draws bench/results.png. Absolute numbers on shared
machines mean little; the ratio against a baseline measured in the same run is the result.
"""
