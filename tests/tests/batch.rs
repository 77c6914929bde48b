//! The poller's batched map reads (`mdsec_agent::batch`) against aya's
//! entry-by-entry iterator, on a real kernel map larger than one batch.

use std::collections::BTreeMap;

use aya::maps::{HashMap as BpfHashMap, IterableMap};
use mdsec_common::{
    flow::{FlowKey4, FlowValue},
    maps as names,
};
use mdsec_tests::kernel::TestProg;

#[test]
fn batched_reads_return_every_entry_once() {
    let mut prog = TestProg::load_with(names::PROGRAM, &[(names::FLOWS4, 65_536)]).unwrap();
    let mut map = prog.take_map(names::FLOWS4).unwrap();
    let mut flows: BpfHashMap<_, FlowKey4, FlowValue> = BpfHashMap::try_from(&mut map).unwrap();
    let empty = mdsec_agent::batch::read_all::<FlowKey4, FlowValue>(flows.map()).unwrap();
    assert!(empty.is_empty());
    // 40,000 entries: more than two batches of 16,384.
    for i in 0..40_000u32 {
        let k = FlowKey4 {
            ifindex: 1,
            vlan: 0,
            proto: 17,
            _pad: 0,
            src: [10, 0, (i >> 8) as u8, i as u8],
            dst: [10, 1, (i >> 16) as u8, 1],
            sport: i as u16,
            dport: 53,
        };
        flows.insert(k, FlowValue { packets: i as u64 + 1, ..Default::default() }, 0).unwrap();
    }
    let batched = mdsec_agent::batch::read_all::<FlowKey4, FlowValue>(flows.map()).unwrap();
    assert_eq!(batched.len(), 40_000, "every entry, none twice");
    let iterated: BTreeMap<FlowKey4, u64> =
        flows.iter().map(|r| r.unwrap()).map(|(k, v)| (k, v.packets)).collect();
    let batched: BTreeMap<FlowKey4, u64> = batched.into_iter().map(|(k, v)| (k, v.packets)).collect();
    assert_eq!(batched, iterated);
}
