"""Model weights for a node's Shards: its model cache (store), fetching tensor byte ranges from
peers and the hub (fetch, peer) and the supply that decides where a stage's weights come from."""
