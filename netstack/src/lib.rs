//! placeholder until the netstack lands
