"""msmoe_dist.moe"""
