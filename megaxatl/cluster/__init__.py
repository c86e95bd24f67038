"""Cluster helpers: SLURM node lists, the TP x PP x DP layout, and the memory / step-time planner.

`layout` and `nodelist` import no torch (the job templates call them before every launch);
`plan` builds the model on the meta device to count parameters.
"""
