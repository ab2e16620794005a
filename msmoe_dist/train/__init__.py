"""msmoe_dist.train"""
