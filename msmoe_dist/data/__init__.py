"""msmoe_dist.data"""
