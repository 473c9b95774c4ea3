//! The few nf_tables operations on the join/leave paths, spoken directly over netlink:
//! does a table/chain/set exist, list a set's elements, and one atomic batch of element
//! additions/deletions, chain flushes/deletions and table deletions.
//!
//! Why by hand: each `nft` run costs a fork+exec and nft's own start-up and cache fill,
//! ~10-17 ms here, and joining or leaving a network needed up to ten of them. No crate
//! fits: `rustables` is GPL-3.0 and `nftnl` binds the C libnftnl; rule expressions are
//! still written by `nft -f` (see the parent module), which is only run when a network or
//! our tables are created. Framing and attribute parsing use `netlink-sys` and
//! `netlink-packet-core` (bounds-checked buffers); only the nf_tables message layout
//! (linux/netfilter/nf_tables.h, nfnetlink.h) is encoded here.
//!
//! The kernel handles a request inside `sendmsg`: when it returns, the replies (acks,
//! errors, a `get`'s answer) are queued on our socket, so a batch's outcome is read without
//! waiting. Only dumps are continued on `recv`.

use std::io;
use std::os::unix::fs::MetadataExt;
use std::sync::{Mutex, TryLockError};

use netlink_packet_core::{NetlinkBuffer, NlaBuffer, NlasIterator, NLA_F_NESTED, NLMSG_DONE, NLMSG_ERROR};
use netlink_sys::{protocols::NETLINK_NETFILTER, Socket, SocketAddr};

/// Address families of nf_tables tables (NFPROTO_*).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Family {
    Ip = 2,
    Bridge = 7,
}

// nfnetlink framing.
const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
const NFNL_MSG_BATCH_END: u16 = 0x11;
// enum nf_tables_msg_types
const NFT_MSG_GETTABLE: u16 = 1;
const NFT_MSG_DELTABLE: u16 = 2;
const NFT_MSG_GETCHAIN: u16 = 4;
const NFT_MSG_DELCHAIN: u16 = 5;
const NFT_MSG_DELRULE: u16 = 8;
const NFT_MSG_GETSET: u16 = 10;
const NFT_MSG_NEWSETELEM: u16 = 12;
const NFT_MSG_GETSETELEM: u16 = 13;
const NFT_MSG_DELSETELEM: u16 = 14;
// Attributes (each enum starts at 1 for the first field).
const NFTA_TABLE_NAME: u16 = 1;
const NFTA_CHAIN_TABLE: u16 = 1;
const NFTA_CHAIN_NAME: u16 = 3;
const NFTA_RULE_TABLE: u16 = 1;
const NFTA_RULE_CHAIN: u16 = 2;
const NFTA_SET_TABLE: u16 = 1;
const NFTA_SET_NAME: u16 = 2;
const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
const NFTA_SET_ELEM_LIST_SET: u16 = 2;
const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_SET_ELEM_KEY: u16 = 1;
const NFTA_SET_ELEM_DATA: u16 = 2;
const NFTA_SET_ELEM_KEY_END: u16 = 10;
const NFTA_DATA_VALUE: u16 = 1;
const NFTA_DATA_VERDICT: u16 = 2;
const NFTA_VERDICT_CODE: u16 = 1;
const NFTA_VERDICT_CHAIN: u16 = 2;
/// `enum nft_verdicts`: NFT_JUMP.
const NFT_JUMP: i32 = -3;

const NLM_F_REQUEST: u16 = 0x1;
/// In a dump's replies: the dumped objects changed meanwhile.
const NLM_F_DUMP_INTR: u16 = 0x10;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_DUMP: u16 = 0x300;
const NLM_F_CREATE: u16 = 0x400;

/// Interface names in set keys: IFNAMSIZ bytes, NUL-padded.
pub(crate) const IFNAMSIZ: usize = 16;

/// A set element's key, in the kernel's layout: each field of a concatenation padded to a
/// multiple of 4 bytes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Key(Vec<u8>);

impl Key {
    /// Appends an interface name (`ifname`); longer names are cut (the kernel's would be
    /// refused earlier: interface names are at most 15 bytes).
    pub fn ifname(mut self, name: &str) -> Key {
        let mut field = [0u8; IFNAMSIZ];
        let n = name.len().min(IFNAMSIZ - 1);
        field[..n].copy_from_slice(&name.as_bytes()[..n]);
        self.0.extend_from_slice(&field);
        self
    }

    /// Appends an `ether_addr` (6 bytes, padded to 8).
    pub fn ether(mut self, mac: [u8; 6]) -> Key {
        self.0.extend_from_slice(&mac);
        self.0.extend_from_slice(&[0, 0]);
        self
    }

    /// Appends an `ipv4_addr` (network order).
    pub fn ipv4(mut self, ip: std::net::Ipv4Addr) -> Key {
        self.0.extend_from_slice(&ip.octets());
        self
    }

    pub fn bytes(&self) -> &[u8] {
        &self.0
    }

    /// The interface name a key starts with (keys of `ifname` and `ifname . X` sets).
    pub fn leading_ifname(&self) -> Option<&str> {
        let field = self.0.get(..IFNAMSIZ)?;
        let end = field.iter().position(|&b| b == 0)?;
        std::str::from_utf8(&field[..end]).ok()
    }
}

/// One element: its key (the range's first key in an interval set, with `key_end` its
/// last), and for a verdict map the chain it jumps to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Element {
    pub key: Key,
    pub key_end: Option<Key>,
    pub jump: Option<String>,
}

impl Element {
    pub fn new(key: Key) -> Element {
        Element { key, key_end: None, jump: None }
    }

    pub fn jump(self, chain: &str) -> Element {
        Element { jump: Some(chain.to_string()), ..self }
    }

    pub fn up_to(self, key_end: Key) -> Element {
        Element { key_end: Some(key_end), ..self }
    }
}

/// A netlink message under construction: header, nfgenmsg, attributes.
struct Msg {
    buf: Vec<u8>,
    /// Offsets of open nested attributes.
    open: Vec<usize>,
}

impl Msg {
    fn new(msg_type: u16, flags: u16, family: u8, res_id: u16) -> Msg {
        let mut buf = Vec::with_capacity(128);
        buf.extend_from_slice(&0u32.to_ne_bytes()); // length, set by finish
        buf.extend_from_slice(&msg_type.to_ne_bytes());
        buf.extend_from_slice(&flags.to_ne_bytes());
        buf.extend_from_slice(&0u32.to_ne_bytes()); // sequence, set by finish
        buf.extend_from_slice(&0u32.to_ne_bytes()); // port: the kernel
        buf.extend_from_slice(&[family, 0]); // nfgen_family, version NFNETLINK_V0
        buf.extend_from_slice(&res_id.to_be_bytes());
        Msg { buf, open: Vec::new() }
    }

    fn nft(msg: u16, flags: u16, family: Family) -> Msg {
        Msg::new((NFNL_SUBSYS_NFTABLES << 8) | msg, flags, family as u8, 0)
    }

    fn attr(mut self, kind: u16, value: &[u8]) -> Msg {
        let len = 4 + value.len();
        self.buf.extend_from_slice(&(len as u16).to_ne_bytes());
        self.buf.extend_from_slice(&kind.to_ne_bytes());
        self.buf.extend_from_slice(value);
        self.pad();
        self
    }

    fn str(self, kind: u16, s: &str) -> Msg {
        let mut v = Vec::with_capacity(s.len() + 1);
        v.extend_from_slice(s.as_bytes());
        v.push(0);
        self.attr(kind, &v)
    }

    fn begin(mut self, kind: u16) -> Msg {
        self.open.push(self.buf.len());
        self.buf.extend_from_slice(&[0, 0]);
        self.buf.extend_from_slice(&(kind | NLA_F_NESTED).to_ne_bytes());
        self
    }

    fn end(mut self) -> Msg {
        if let Some(start) = self.open.pop() {
            let len = (self.buf.len() - start) as u16;
            self.buf[start..start + 2].copy_from_slice(&len.to_ne_bytes());
        }
        self
    }

    fn pad(&mut self) {
        while !self.buf.len().is_multiple_of(4) {
            self.buf.push(0);
        }
    }

    fn finish(mut self, seq: u32) -> Vec<u8> {
        debug_assert!(self.open.is_empty(), "unbalanced nested attributes");
        let len = self.buf.len() as u32;
        self.buf[0..4].copy_from_slice(&len.to_ne_bytes());
        self.buf[8..12].copy_from_slice(&seq.to_ne_bytes());
        self.buf
    }
}

/// A socket to nf_tables in the calling thread's network namespace.
pub(crate) struct Nfnl {
    sock: Socket,
    seq: u32,
}

/// This process's socket and the network namespace it was opened in.
static SHARED: Mutex<Option<(u64, Nfnl)>> = Mutex::new(None);

/// Runs `f` with this process's nf_tables socket for the calling thread's network namespace,
/// (re)opened as needed: one socket for the process's life rather than one per operation
/// (socket, bind, getsockname, connect each time). Never blocks on another thread: if the
/// shared socket is busy (or held by a thread that panicked), `f` gets a private one. A
/// socket whose operation failed is not reused (it may hold a half-read reply).
pub(crate) fn with<R>(f: impl FnOnce(&mut Nfnl) -> io::Result<R>) -> io::Result<R> {
    let ns = std::fs::metadata("/proc/thread-self/ns/net")?.ino();
    let mut shared = match SHARED.try_lock() {
        Ok(g) => g,
        Err(TryLockError::WouldBlock) | Err(TryLockError::Poisoned(_)) => return f(&mut Nfnl::open()?),
    };
    let nl = match &mut *shared {
        Some((id, nl)) if *id == ns => nl,
        other => &mut other.insert((ns, Nfnl::open()?)).1,
    };
    let res = f(nl);
    if res.is_err() {
        *shared = None;
    }
    res
}

/// Most nf_tables replies fit a page; dumps come in up to 16 KiB parts (NLMSG_GOODSIZE),
/// and a 64 KiB buffer never cuts one.
const RECV_BUF: usize = 64 * 1024;

impl Nfnl {
    pub fn open() -> io::Result<Nfnl> {
        let mut sock = Socket::new(NETLINK_NETFILTER)?;
        sock.bind_auto()?;
        sock.connect(&SocketAddr::new(0, 0))?;
        Ok(Nfnl { sock, seq: 1 })
    }

    fn send(&self, bytes: &[u8]) -> io::Result<()> {
        loop {
            match self.sock.send(bytes, 0) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                res => return res.map(drop),
            }
        }
    }

    /// One datagram into `buf`; `Ok(None)` if `nonblocking` and none is queued.
    fn recv(&self, buf: &mut [u8], nonblocking: bool) -> io::Result<Option<usize>> {
        let flags = if nonblocking { libc::MSG_DONTWAIT } else { 0 };
        loop {
            match self.sock.recv(&mut &mut buf[..], flags) {
                Ok(n) => return Ok(Some(n)),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && nonblocking => return Ok(None),
                Err(e) => return Err(e),
            }
        }
    }

    fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1);
        self.seq
    }

    /// Sends one request and reads until its ack: Ok(true) if answered, Ok(false) on ENOENT.
    fn exists(&mut self, msg: Msg) -> io::Result<bool> {
        let seq = self.next_seq();
        self.send(&msg.finish(seq))?;
        let mut result = None;
        let mut buf = vec![0u8; RECV_BUF];
        while result.is_none() {
            let n = self.recv(&mut buf, false)?.unwrap_or_default();
            for_each_reply(&buf[..n], seq, |kind, _, payload| {
                if kind == NLMSG_ERROR {
                    result = Some(match error_code(payload)? {
                        0 => Ok(true),
                        e if e == libc::ENOENT => Ok(false),
                        e => Err(io::Error::from_raw_os_error(e)),
                    });
                }
                Ok(())
            })?;
        }
        result.unwrap_or(Ok(false))
    }

    pub fn table_exists(&mut self, family: Family, table: &str) -> io::Result<bool> {
        self.exists(Msg::nft(NFT_MSG_GETTABLE, NLM_F_REQUEST | NLM_F_ACK, family).str(NFTA_TABLE_NAME, table))
    }

    pub fn chain_exists(&mut self, family: Family, table: &str, chain: &str) -> io::Result<bool> {
        self.exists(
            Msg::nft(NFT_MSG_GETCHAIN, NLM_F_REQUEST | NLM_F_ACK, family)
                .str(NFTA_CHAIN_TABLE, table)
                .str(NFTA_CHAIN_NAME, chain),
        )
    }

    pub fn set_exists(&mut self, family: Family, table: &str, set: &str) -> io::Result<bool> {
        self.exists(
            Msg::nft(NFT_MSG_GETSET, NLM_F_REQUEST | NLM_F_ACK, family)
                .str(NFTA_SET_TABLE, table)
                .str(NFTA_SET_NAME, set),
        )
    }

    /// Every element of a set or map (empty if the set or its table does not exist). A dump
    /// that a concurrent change interrupted (NLM_F_DUMP_INTR: it may miss or repeat
    /// elements) is done again.
    pub fn elements(&mut self, family: Family, table: &str, set: &str) -> io::Result<Vec<Element>> {
        const TRIES: usize = 5;
        for _ in 1..TRIES {
            if let (out, false) = self.dump_elements(family, table, set)? {
                return Ok(out);
            }
        }
        let (out, interrupted) = self.dump_elements(family, table, set)?;
        if interrupted {
            return Err(io::Error::other(format!("the elements of {set} kept changing while listed")));
        }
        Ok(out)
    }

    /// One dump: (elements, whether it was interrupted).
    fn dump_elements(&mut self, family: Family, table: &str, set: &str) -> io::Result<(Vec<Element>, bool)> {
        let seq = self.next_seq();
        let msg = Msg::nft(NFT_MSG_GETSETELEM, NLM_F_REQUEST | NLM_F_DUMP, family)
            .str(NFTA_SET_ELEM_LIST_TABLE, table)
            .str(NFTA_SET_ELEM_LIST_SET, set);
        self.send(&msg.finish(seq))?;
        let (mut out, mut interrupted) = (Vec::new(), false);
        let mut buf = vec![0u8; RECV_BUF];
        let mut done = false;
        while !done {
            let n = self.recv(&mut buf, false)?.unwrap_or_default();
            for_each_reply(&buf[..n], seq, |kind, flags, payload| {
                interrupted |= flags & NLM_F_DUMP_INTR != 0;
                match kind {
                    NLMSG_DONE => done = true,
                    NLMSG_ERROR => {
                        done = true;
                        match error_code(payload)? {
                            0 => {}
                            e if e == libc::ENOENT => out.clear(),
                            e => return Err(io::Error::from_raw_os_error(e)),
                        }
                    }
                    k if k == (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWSETELEM => parse_elements(payload, &mut out)?,
                    _ => {}
                }
                Ok(())
            })?;
        }
        Ok((out, interrupted))
    }
}

/// Changes applied in one nf_tables transaction: all or nothing.
pub(crate) struct Batch {
    family: Family,
    table: String,
    msgs: Vec<Msg>,
}

impl Batch {
    pub fn new(family: Family, table: &str) -> Batch {
        Batch { family, table: table.to_string(), msgs: Vec::new() }
    }

    fn element_msg(&self, msg: u16, flags: u16, set: &str, e: &Element, with_data: bool) -> Msg {
        let mut m = Msg::nft(msg, NLM_F_REQUEST | NLM_F_ACK | flags, self.family)
            .str(NFTA_SET_ELEM_LIST_TABLE, &self.table)
            .str(NFTA_SET_ELEM_LIST_SET, set)
            .begin(NFTA_SET_ELEM_LIST_ELEMENTS)
            .begin(NFTA_LIST_ELEM)
            .begin(NFTA_SET_ELEM_KEY)
            .attr(NFTA_DATA_VALUE, e.key.bytes())
            .end();
        if let Some(end) = &e.key_end {
            m = m.begin(NFTA_SET_ELEM_KEY_END).attr(NFTA_DATA_VALUE, end.bytes()).end();
        }
        if let (true, Some(chain)) = (with_data, &e.jump) {
            m = m
                .begin(NFTA_SET_ELEM_DATA)
                .begin(NFTA_DATA_VERDICT)
                .attr(NFTA_VERDICT_CODE, &NFT_JUMP.to_be_bytes())
                .str(NFTA_VERDICT_CHAIN, chain)
                .end()
                .end();
        }
        m.end().end()
    }

    /// `add element ... set { key }`, `{ key-key_end }` in an interval set, or
    /// `{ key : jump CHAIN }` in a verdict map.
    pub fn add_element(&mut self, set: &str, e: &Element) -> &mut Batch {
        let m = self.element_msg(NFT_MSG_NEWSETELEM, NLM_F_CREATE, set, e, true);
        self.msgs.push(m);
        self
    }

    /// `delete element` (fails the batch if absent).
    pub fn delete_element(&mut self, set: &str, e: &Element) -> &mut Batch {
        let m = self.element_msg(NFT_MSG_DELSETELEM, 0, set, e, false);
        self.msgs.push(m);
        self
    }

    /// `flush chain`: deletes every rule of the chain.
    pub fn flush_chain(&mut self, chain: &str) -> &mut Batch {
        let m = Msg::nft(NFT_MSG_DELRULE, NLM_F_REQUEST | NLM_F_ACK, self.family)
            .str(NFTA_RULE_TABLE, &self.table)
            .str(NFTA_RULE_CHAIN, chain);
        self.msgs.push(m);
        self
    }

    /// `delete chain` (an empty chain nothing jumps to).
    pub fn delete_chain(&mut self, chain: &str) -> &mut Batch {
        let m = Msg::nft(NFT_MSG_DELCHAIN, NLM_F_REQUEST | NLM_F_ACK, self.family)
            .str(NFTA_CHAIN_TABLE, &self.table)
            .str(NFTA_CHAIN_NAME, chain);
        self.msgs.push(m);
        self
    }

    /// `delete table`, with everything in it.
    pub fn delete_table(&mut self) -> &mut Batch {
        let m = Msg::nft(NFT_MSG_DELTABLE, NLM_F_REQUEST | NLM_F_ACK, self.family).str(NFTA_TABLE_NAME, &self.table);
        self.msgs.push(m);
        self
    }

    /// The whole batch as one datagram, from sequence number `seq` on.
    fn encode(self, seq: u32) -> (Vec<u8>, u32) {
        let count = self.msgs.len() as u32;
        let res_id = NFNL_SUBSYS_NFTABLES;
        let mut out = Msg::new(NFNL_MSG_BATCH_BEGIN, NLM_F_REQUEST, 0, res_id).finish(seq);
        for (i, m) in self.msgs.into_iter().enumerate() {
            out.extend(m.finish(seq.wrapping_add(1 + i as u32)));
        }
        out.extend(Msg::new(NFNL_MSG_BATCH_END, NLM_F_REQUEST, 0, res_id).finish(seq.wrapping_add(1 + count)));
        (out, count)
    }

    /// Applies the batch. The first error the kernel reports fails it (and nothing of it
    /// is applied). Every message asks for an ack, and all replies are queued by the time
    /// `send` returns, so they are read without blocking.
    pub fn commit(self, nl: &mut Nfnl) -> io::Result<()> {
        if self.msgs.is_empty() {
            return Ok(());
        }
        let first = nl.seq.wrapping_add(1);
        let (bytes, count) = self.encode(first);
        nl.seq = first.wrapping_add(count + 1);
        nl.send(&bytes)?;
        let mut acks = 0u32;
        let mut failure = None;
        let mut buf = vec![0u8; RECV_BUF];
        while let Some(n) = nl.recv(&mut buf, true)? {
            for_each_message(&buf[..n], |kind, _, seq, payload| {
                let ours = seq.wrapping_sub(first) <= count;
                if kind == NLMSG_ERROR && ours {
                    match error_code(payload)? {
                        0 => acks += 1,
                        e => {
                            failure.get_or_insert(e);
                        }
                    }
                }
                Ok(())
            })?;
        }
        match failure {
            Some(e) => Err(io::Error::from_raw_os_error(e)),
            None if acks < count => Err(io::Error::other(format!("nf_tables acknowledged {acks} of {count} changes"))),
            None => Ok(()),
        }
    }
}

/// Calls `f(type, flags, seq, payload)` for each netlink message in a datagram.
fn for_each_message(mut data: &[u8], mut f: impl FnMut(u16, u16, u32, &[u8]) -> io::Result<()>) -> io::Result<()> {
    while !data.is_empty() {
        let msg = NetlinkBuffer::new_checked(data).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        let len = msg.length() as usize;
        f(msg.message_type(), msg.flags(), msg.sequence_number(), msg.payload())?;
        let step = len.next_multiple_of(4).min(data.len());
        data = &data[step..];
    }
    Ok(())
}

/// Like [`for_each_message`], only the replies to `seq`: `f(type, flags, payload)`.
fn for_each_reply(data: &[u8], seq: u32, mut f: impl FnMut(u16, u16, &[u8]) -> io::Result<()>) -> io::Result<()> {
    for_each_message(data, |kind, flags, s, payload| if s == seq { f(kind, flags, payload) } else { Ok(()) })
}

/// The errno of an NLMSG_ERROR payload (0 for an ack).
fn error_code(payload: &[u8]) -> io::Result<i32> {
    let raw = payload.get(..4).ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "short netlink error"))?;
    Ok(i32::from_ne_bytes([raw[0], raw[1], raw[2], raw[3]]).saturating_neg())
}

fn nlas(data: &[u8]) -> impl Iterator<Item = io::Result<NlaBuffer<&[u8]>>> {
    NlasIterator::new(data).map(|r| r.map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e)))
}

/// An attribute's kind (flags masked off) and value. `new_checked` (in the iterator)
/// guarantees 4 <= length <= the buffer's length.
fn split(nla: NlaBuffer<&[u8]>) -> (u16, &[u8]) {
    let (kind, len) = (nla.kind() & !NLA_F_NESTED, usize::from(nla.length()));
    let bytes = nla.into_inner();
    (kind, bytes.get(4..len).unwrap_or_default())
}

/// The value of the first attribute of `kind` in `data`.
fn find(data: &[u8], kind: u16) -> io::Result<Option<&[u8]>> {
    for nla in nlas(data) {
        let (k, value) = split(nla?);
        if k == kind {
            return Ok(Some(value));
        }
    }
    Ok(None)
}

/// Elements of one NEWSETELEM message (after its 4-byte nfgenmsg).
fn parse_elements(payload: &[u8], out: &mut Vec<Element>) -> io::Result<()> {
    let attrs = payload.get(4..).unwrap_or_default();
    let Some(list) = find(attrs, NFTA_SET_ELEM_LIST_ELEMENTS)? else {
        return Ok(());
    };
    for elem in nlas(list) {
        let (kind, elem) = split(elem?);
        if kind != NFTA_LIST_ELEM {
            continue;
        }
        let Some(key) = find(elem, NFTA_SET_ELEM_KEY)?.map(|k| find(k, NFTA_DATA_VALUE)).transpose()?.flatten()
        else {
            continue;
        };
        let key_end = find(elem, NFTA_SET_ELEM_KEY_END)?.map(|k| find(k, NFTA_DATA_VALUE)).transpose()?.flatten();
        let verdict = match find(elem, NFTA_SET_ELEM_DATA)? {
            Some(data) => find(data, NFTA_DATA_VERDICT)?,
            None => None,
        };
        let jump = match verdict {
            Some(v) => find(v, NFTA_VERDICT_CHAIN)?
                .map(|c| String::from_utf8_lossy(c.split(|&b| b == 0).next().unwrap_or_default()).into_owned()),
            None => None,
        };
        out.push(Element { key: Key(key.to_vec()), key_end: key_end.map(|k| Key(k.to_vec())), jump });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_follow_the_kernel_layout() {
        let k = Key::default().ifname("tap1").ether([0x52, 0x54, 0, 0, 0, 7]);
        let mut want = b"tap1".to_vec();
        want.resize(16, 0);
        want.extend_from_slice(&[0x52, 0x54, 0, 0, 0, 7, 0, 0]);
        assert_eq!(k.bytes(), &want[..]);
        assert_eq!(k.leading_ifname(), Some("tap1"));
        let k = Key::default().ifname("mvtap-abc-0").ipv4(std::net::Ipv4Addr::new(10, 200, 0, 5));
        assert_eq!(k.bytes().len(), 20);
        assert_eq!(&k.bytes()[16..], &[10, 200, 0, 5]);
        // Always NUL-terminated, so a 16-byte name cannot run into the next field.
        assert_eq!(Key::default().ifname("0123456789abcdefXYZ").leading_ifname(), Some("0123456789abcde"));
        assert_eq!(Key(vec![b'x'; 16]).leading_ifname(), None);
    }

    #[test]
    fn batch_framing() {
        let mut b = Batch::new(Family::Bridge, "microvm");
        b.add_element("guard_tap", &Element::new(Key::default().ifname("t")).jump("check_lease"));
        b.delete_element("guard_mac", &Element::new(Key::default().ifname("t").ether([1, 2, 3, 4, 5, 6])));
        let (bytes, count) = b.encode(100);
        assert_eq!(count, 2);
        let mut seen = Vec::new();
        for_each_message(&bytes, |kind, _, seq, payload| {
            seen.push((kind, seq, payload.len()));
            Ok(())
        })
        .unwrap();
        let kinds: Vec<(u16, u32)> = seen.iter().map(|(k, s, _)| (*k, *s)).collect();
        assert_eq!(
            kinds,
            vec![
                (NFNL_MSG_BATCH_BEGIN, 100),
                ((10 << 8) | NFT_MSG_NEWSETELEM, 101),
                ((10 << 8) | NFT_MSG_DELSETELEM, 102),
                (NFNL_MSG_BATCH_END, 103)
            ]
        );
        // The batch begin names the nf_tables subsystem (big endian res_id).
        assert_eq!(&bytes[16..20], &[0, 0, 0, 10]);
    }

    #[test]
    fn element_round_trip() {
        // A NEWSETELEM as the kernel lists it has the same attribute layout we send.
        let map = Element::new(Key::default().ifname("mvtap-1-0")).jump("check_lease");
        let ip = |last| Key::default().ifname("mvbr-a").ifname("up0").ipv4(std::net::Ipv4Addr::new(10, 200, 0, last));
        let range = Element::new(ip(0)).up_to(ip(255));
        let mut b = Batch::new(Family::Bridge, "microvm");
        b.add_element("guard_tap", &map);
        b.add_element("net_nat", &range);
        let mut out = Vec::new();
        for m in b.msgs {
            let msg = m.finish(1);
            for_each_message(&msg, |_, _, _, payload| parse_elements(payload, &mut out)).unwrap();
        }
        assert_eq!(out, vec![map, range]);
    }

    #[test]
    fn hostile_replies_are_errors_not_panics() {
        let mut out = Vec::new();
        for bad in [&[0xffu8, 0xff, 0, 0][..], &[8, 0, 0, 0, 1], &[]] {
            let _ = for_each_message(bad, |_, _, _, p| parse_elements(p, &mut out));
            let _ = parse_elements(bad, &mut out);
        }
        assert!(error_code(&[1, 2]).is_err());
    }
}
