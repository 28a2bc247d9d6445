//! `COPY … FROM` a buffer in this process's memory: PostgreSQL's own COPY machinery
//! (`BeginCopyFrom` with a data-source callback, then `CopyFrom`), so a batch takes the
//! same path as `COPY` — heap multi-insert, triggers, partition routing, constraints,
//! indexes — with no file in between: nothing written to disk and read back, nothing
//! another OS user could race, and no need for `pg_read_server_files` on the part of
//! whoever the batch runs as.
//!
//! What `DoCopy` checks before it calls `CopyFrom` is checked here too: the current
//! user's INSERT privilege on the columns (`ExecCheckRTPerms`), and row-level security,
//! which `COPY FROM` cannot apply: a caller must not come here for a table where it
//! applies to the current user (see [`crate::target::Admission::copy`]).

use std::cell::Cell;
use std::ffi::CString;
use std::sync::atomic::{AtomicU64, Ordering};

use pgrx::pg_sys;

use crate::error::{Result, StoreError};

/// The largest private memory this process held at the end of a COPY, with the batch,
/// its encoding and the COPY's own buffers still held: where inserting peaks. Read into
/// the job's `memory_peak` ([`peak_memory`]).
static PEAK: AtomicU64 = AtomicU64::new(0);

/// See [`PEAK`].
pub fn peak_memory() -> u64 {
    PEAK.load(Ordering::Relaxed)
}

/// A job begins in this process: what earlier jobs held is not its.
pub fn forget_peak_memory() {
    PEAK.store(0, Ordering::Relaxed);
}

thread_local! {
    /// What the data-source callback hands out: the rest of the current buffer.
    static SOURCE: Cell<(*const u8, usize)> = const { Cell::new((std::ptr::null(), 0)) };
}

/// `copy_data_source_cb`: hand PostgreSQL the next piece of [`SOURCE`].
unsafe extern "C-unwind" fn read_source(
    outbuf: *mut std::ffi::c_void,
    _minread: std::ffi::c_int,
    maxread: std::ffi::c_int,
) -> std::ffi::c_int {
    SOURCE.with(|s| {
        let (ptr, left) = s.get();
        let n = left.min(maxread.max(0) as usize);
        if n > 0 {
            // SAFETY: `ptr` points at `left` readable bytes of the buffer `copy` holds
            // for the duration of the COPY; `outbuf` has room for `maxread` bytes.
            unsafe { std::ptr::copy_nonoverlapping(ptr, outbuf.cast::<u8>(), n) };
            // SAFETY: stays within (or one past the end of) the same buffer.
            s.set((unsafe { ptr.add(n) }, left - n));
        }
        n as std::ffi::c_int
    })
}

/// Empties [`SOURCE`] however the COPY ends (an ERROR unwinds through it).
struct Source;

impl Source {
    fn set(data: &[u8]) -> Source {
        SOURCE.with(|s| s.set((data.as_ptr(), data.len())));
        Source
    }
}

impl Drop for Source {
    fn drop(&mut self) {
        SOURCE.with(|s| s.set((std::ptr::null(), 0)));
    }
}

/// COPY `data` (binary COPY format, one field per column of `columns`, in that order)
/// into table `rel`, as the current user; the number of rows inserted (a row a BEFORE
/// trigger suppressed is not counted, as for `COPY`). Run inside a transaction, with a
/// snapshot pushed.
pub fn copy(rel: pg_sys::Oid, columns: &[&str], data: &[u8]) -> Result<u64> {
    // A statement's snapshot, taken now, as PostgreSQL takes one for each statement.
    crate::read::fresh(|| copy_now(rel, columns, data))
}

fn copy_now(rel: pg_sys::Oid, columns: &[&str], data: &[u8]) -> Result<u64> {
    let names = columns
        .iter()
        .map(|c| CString::new(*c))
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|_| StoreError::internal("a column name holds a NUL byte"))?;
    let _source = Source::set(data);
    // SAFETY: the sequence of `DoCopy` (src/backend/commands/copy.c) for a COPY FROM of
    // a relation, on the main thread, inside a transaction; every ERROR longjmps out
    // through pgrx's guard, and the transaction's abort releases what was opened here.
    unsafe {
        let lock = pg_sys::RowExclusiveLock as pg_sys::LOCKMODE;
        let relation = pg_sys::table_open(rel, lock);
        let pstate = pg_sys::make_parsestate(std::ptr::null_mut());
        let nsitem = pg_sys::addRangeTableEntryForRelation(pstate, relation, lock, std::ptr::null_mut(), false, false);
        let rte = (*nsitem).p_rte;
        (*rte).requiredPerms = pg_sys::ACL_INSERT as pg_sys::AclMode;
        let mut attnames: *mut pg_sys::List = std::ptr::null_mut();
        for name in &names {
            let attnum = pg_sys::get_attnum(rel, name.as_ptr());
            if attnum == pg_sys::InvalidAttrNumber as pg_sys::AttrNumber {
                return Err(StoreError::internal(format!(
                    "column \"{}\" of the target is gone",
                    name.to_string_lossy()
                )));
            }
            (*rte).insertedCols = pg_sys::bms_add_member(
                (*rte).insertedCols,
                i32::from(attnum) - pg_sys::FirstLowInvalidHeapAttributeNumber,
            );
            attnames = pg_sys::lappend(attnames, pg_sys::makeString(pg_sys::pstrdup(name.as_ptr())).cast());
        }
        pg_sys::ExecCheckRTPerms((*pstate).p_rtable, true);
        let format = pg_sys::makeDefElem(
            pg_sys::pstrdup(c"format".as_ptr()),
            pg_sys::makeString(pg_sys::pstrdup(c"binary".as_ptr())).cast(),
            -1,
        );
        let options = pg_sys::lappend(std::ptr::null_mut(), format.cast());
        let cstate = pg_sys::BeginCopyFrom(
            pstate,
            relation,
            std::ptr::null_mut(),
            std::ptr::null(),
            false,
            Some(read_source),
            attnames,
            options,
        );
        let rows = pg_sys::CopyFrom(cstate);
        PEAK.fetch_max(store_engine::private_rss().unwrap_or(0), Ordering::Relaxed);
        pg_sys::EndCopyFrom(cstate);
        pg_sys::table_close(relation, pg_sys::NoLock as pg_sys::LOCKMODE);
        pg_sys::free_parsestate(pstate);
        // What follows in the transaction (a look-up, the checkpoint) sees these rows.
        pg_sys::CommandCounterIncrement();
        Ok(rows)
    }
}

/// `lines` in binary COPY format: one text field per row, and with `key_column` a
/// second, bytea, field holding `store.line_key` of the line. Sized from the lines' bytes
/// up front (exactly, without a key column): a buffer grown by doubling held up to three
/// times the batch while it moved.
pub fn encode<'a>(lines: impl Iterator<Item = &'a str> + Clone, key_column: bool) -> Vec<u8> {
    let bytes: usize = lines.clone().map(|l| 6 + l.len()).sum();
    let mut w = Vec::with_capacity(21 + if key_column { 2 * bytes } else { bytes });
    encode_into(&mut w, lines, key_column).expect("writing to a Vec cannot fail");
    w
}

/// [`encode`] into `w`, as it goes.
pub fn encode_into<'a, W: std::io::Write>(
    w: &mut W,
    lines: impl Iterator<Item = &'a str>,
    key_column: bool,
) -> std::io::Result<()> {
    w.write_all(b"PGCOPY\n\xff\r\n\0")?;
    w.write_all(&0i32.to_be_bytes())?; // flags
    w.write_all(&0i32.to_be_bytes())?; // header extension
    let fields: i16 = if key_column { 2 } else { 1 };
    for line in lines {
        w.write_all(&fields.to_be_bytes())?;
        w.write_all(&(line.len() as i32).to_be_bytes())?;
        w.write_all(line.as_bytes())?;
        if key_column {
            let key = store_engine::line_key(line.as_bytes());
            w.write_all(&(key.len() as i32).to_be_bytes())?;
            w.write_all(&key)?;
        }
    }
    w.write_all(&(-1i16).to_be_bytes())
}

#[cfg(test)]
mod tests {
    use super::{encode, encode_into};

    #[test]
    fn a_batch_is_encoded_in_one_buffer_of_its_exact_size_and_streamed_the_same() {
        let lines = ["", "a", "ümlaut", &"x".repeat(70_000)];
        let data = encode(lines.iter().copied(), false);
        // Header 19 bytes, each row a field count (2), a length (4) and the line, trailer 2.
        let want = 19 + lines.iter().map(|l| 6 + l.len()).sum::<usize>() + 2;
        assert_eq!((data.len(), data.capacity()), (want, want), "sized once, never grown");
        assert_eq!(&data[..11], b"PGCOPY\n\xff\r\n\0");
        assert_eq!(&data[want - 2..], &(-1i16).to_be_bytes());
        assert_eq!(&data[19..25], &[0, 1, 0, 0, 0, 0], "one field, of length 0");
        let mut streamed = Vec::new();
        encode_into(&mut streamed, lines.iter().copied(), false).unwrap();
        assert_eq!(streamed, data);
        let keyed = encode(lines.iter().copied(), true);
        let mut streamed = Vec::new();
        encode_into(&mut streamed, lines.iter().copied(), true).unwrap();
        assert_eq!(streamed, keyed);
        assert!(keyed.len() > data.len());
    }
}
