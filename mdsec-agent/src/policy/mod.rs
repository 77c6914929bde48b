//! Segment policy: load and validate the YAML directory ([`model`]), compile it to
//! datapath entries ([`compile`]), and swap it into the kernel ([`maps`]).

pub mod approval;
pub mod compile;
pub mod maps;
pub mod model;
pub mod ondemand;
pub mod quarantine;
pub mod runtime;
pub mod window;
