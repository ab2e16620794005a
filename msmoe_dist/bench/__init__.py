"""msmoe_dist.bench"""
