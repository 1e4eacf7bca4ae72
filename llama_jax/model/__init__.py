"""The LLaMA decoder and what it is made of: attention kernels and their table, linear ops, the fused
LM-head loss, remat policies, parameter and FLOP counts. Names no mesh axis, and knows nothing of
what wraps it: its linear layers go through one method that can be intercepted (llama.Projections)."""
