"""The engine: the one door every way in calls, and what it keeps.

Its cache, jobs, execution slots, audit log and metrics.
"""
