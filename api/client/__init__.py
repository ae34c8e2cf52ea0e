"""api/client"""
