"""The hindsight step (spec §3.4-3.9): drafts, hindsight prompts, bonus, merge; step.py runs them in order."""
