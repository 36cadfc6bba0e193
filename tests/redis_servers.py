"""Throwaway redis-server fixtures (``redis_url``, ``redis_cluster_url``) — filled in by the Redis store work."""
