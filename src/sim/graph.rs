//! Graph tenant simulator (being written).
