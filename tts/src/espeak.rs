//! The one FFI module: four functions of libespeak-ng (Debian's `libespeak-ng-dev`, 1.51).
//!
//! espeak-ng is a C library with process-wide state (the selected voice, its translator, the
//! synthesis buffers) and is not thread-safe. Every call therefore goes through [`with`], which
//! holds one process-wide mutex for the whole sequence of calls; nothing else in the crate
//! touches the library. The mutex is the one global here, and it mirrors the C library's own.
//!
//! Why `unsafe` is sound here (the workspace denies `unsafe_code`; this module alone allows it):
//! - every call happens with [`LOCK`] held, so the library's globals are never used by two
//!   threads at once;
//! - strings passed in are `CString`s that outlive the call; `espeak_TextToPhonemes` only
//!   advances our pointer within that string (or sets it to NULL at the end), and we read the
//!   returned phonemes into an owned `String` before the next call overwrites its buffer;
//! - the synthesis callback only runs inside `espeak_Synth` (synchronous mode), on this thread,
//!   and the `user_data` pointer it receives is a `&mut Vec<i16>` that lives on our stack for
//!   the whole `espeak_Synth` call.

#![allow(unsafe_code)]

use std::{
    ffi::{c_char, c_int, c_short, c_uint, c_void, CStr, CString},
    sync::Mutex,
};

#[repr(C)]
struct EspeakEvent {
    kind: c_int,
    unique_identifier: c_uint,
    text_position: c_int,
    length: c_int,
    audio_position: c_int,
    sample: c_int,
    user_data: *mut c_void,
    /// A union of int, `const char*` and `char[8]` in C: 8 bytes.
    id: u64,
}

type SynthCallback = extern "C" fn(*mut c_short, c_int, *mut EspeakEvent) -> c_int;

const AUDIO_OUTPUT_SYNCHRONOUS: c_int = 2;
const ESPEAK_CHARS_UTF8: c_int = 1;
const ESPEAK_PHONEMES_IPA: c_int = 0x02;
const ESPEAK_RATE: c_int = 1;
const EE_OK: c_int = 0;
/// `espeakINITIALIZE_DONT_EXIT`: report errors instead of calling `exit()`.
const INIT_DONT_EXIT: c_int = 0x8000;

#[link(name = "espeak-ng")]
extern "C" {
    fn espeak_Initialize(
        output: c_int,
        buflength: c_int,
        path: *const c_char,
        options: c_int,
    ) -> c_int;
    fn espeak_SetVoiceByName(name: *const c_char) -> c_int;
    fn espeak_TextToPhonemes(
        textptr: *mut *const c_void,
        textmode: c_int,
        phonememode: c_int,
    ) -> *const c_char;
    fn espeak_SetSynthCallback(cb: SynthCallback);
    fn espeak_SetParameter(parameter: c_int, value: c_int, relative: c_int) -> c_int;
    fn espeak_Synth(
        text: *const c_void,
        size: usize,
        position: c_uint,
        position_type: c_int,
        end_position: c_uint,
        flags: c_uint,
        unique_identifier: *mut c_uint,
        user_data: *mut c_void,
    ) -> c_int;
}

/// espeak-ng failed.
#[derive(Debug, Clone, thiserror::Error)]
#[error("espeak-ng: {0}")]
pub struct EspeakError(pub String);

/// Library state behind the mutex: initialised once, remembers the selected voice.
struct State {
    sample_rate: u32,
    voice: Option<String>,
}

/// The process-wide lock around libespeak-ng (see the module docs).
static LOCK: Mutex<Option<Result<State, EspeakError>>> = Mutex::new(None);

/// A locked, initialised espeak-ng.
pub struct Espeak<'a> {
    state: &'a mut State,
}

/// Run `f` with the library locked and initialised (once per process).
pub fn with<R>(f: impl FnOnce(&mut Espeak<'_>) -> R) -> Result<R, EspeakError> {
    let mut guard = LOCK.lock().unwrap_or_else(|p| p.into_inner());
    if guard.is_none() {
        // SAFETY: lock held; a null path means the default espeak-ng-data location.
        let rate = unsafe {
            espeak_Initialize(
                AUDIO_OUTPUT_SYNCHRONOUS,
                0,
                std::ptr::null(),
                INIT_DONT_EXIT,
            )
        };
        *guard = Some(if rate > 0 {
            // SAFETY: lock held; the callback is a plain function with the C signature.
            unsafe { espeak_SetSynthCallback(synth_callback) };
            Ok(State {
                sample_rate: rate as u32,
                voice: None,
            })
        } else {
            Err(EspeakError(
                "initialisation failed (is espeak-ng-data installed? run deploy/install-deps.sh)"
                    .into(),
            ))
        });
    }
    match guard.as_mut().expect("initialised above") {
        Ok(state) => Ok(f(&mut Espeak { state })),
        Err(e) => Err(e.clone()),
    }
}

/// One clause as espeak-ng phonemized it.
#[derive(Debug, Clone, PartialEq)]
pub struct RawClause {
    /// IPA phonemes, words separated by spaces, no punctuation.
    pub phonemes: String,
    /// Byte range of the input espeak-ng consumed for this clause (it reads one character of
    /// the next clause ahead, which is included here unless this is the last clause).
    pub consumed: std::ops::Range<usize>,
    pub last: bool,
}

impl Espeak<'_> {
    /// espeak-ng's output sample rate (22,050 Hz).
    pub fn sample_rate(&self) -> u32 {
        self.state.sample_rate
    }

    /// Select a language voice (`en-us`, `de`, …), unless it is already selected.
    pub fn set_voice(&mut self, voice: &str) -> Result<(), EspeakError> {
        if self.state.voice.as_deref() == Some(voice) {
            return Ok(());
        }
        let name = CString::new(voice).map_err(|_| EspeakError("voice name has NUL".into()))?;
        // SAFETY: lock held (we are inside `with`); `name` outlives the call.
        let rc = unsafe { espeak_SetVoiceByName(name.as_ptr()) };
        if rc != EE_OK {
            self.state.voice = None;
            return Err(EspeakError(format!("unknown espeak-ng voice `{voice}`")));
        }
        self.state.voice = Some(voice.to_string());
        Ok(())
    }

    /// Phonemize `text` clause by clause (IPA).
    pub fn text_to_phonemes(&mut self, text: &str) -> Result<Vec<RawClause>, EspeakError> {
        let text: String = text.chars().filter(|c| *c != '\0').collect();
        let c = CString::new(text.as_str()).expect("NULs removed");
        let base = c.as_ptr() as usize;
        let len = text.len();
        let mut ptr: *const c_void = c.as_ptr().cast();
        let mut clauses = Vec::new();
        while !ptr.is_null() {
            let start = ptr as usize - base;
            if start >= len {
                break;
            }
            // SAFETY: lock held; `ptr` points into `c`, which lives until the end of this
            // function; espeak advances it within the string or sets it to NULL.
            let out =
                unsafe { espeak_TextToPhonemes(&mut ptr, ESPEAK_CHARS_UTF8, ESPEAK_PHONEMES_IPA) };
            let phonemes = if out.is_null() {
                String::new()
            } else {
                // SAFETY: espeak returns a NUL-terminated buffer valid until its next call.
                unsafe { CStr::from_ptr(out) }
                    .to_string_lossy()
                    .into_owned()
            };
            let last = ptr.is_null();
            let end = if last {
                len
            } else {
                (ptr as usize - base).min(len)
            };
            clauses.push(RawClause {
                phonemes,
                consumed: start..end.max(start),
                last,
            });
            if !last && end <= start {
                break; // no progress: never loop forever
            }
        }
        Ok(clauses)
    }

    /// Synthesize `text` with espeak-ng's own (formant) voice at `rate` words per minute.
    pub fn synthesize(&mut self, text: &str, rate_wpm: u32) -> Result<Vec<i16>, EspeakError> {
        let text: String = text.chars().filter(|c| *c != '\0').collect();
        let c = CString::new(text).expect("NULs removed");
        let mut samples: Vec<i16> = Vec::new();
        // SAFETY: lock held for both calls; in synchronous mode `espeak_Synth` returns only
        // after the last callback, so `samples` (passed as user_data) outlives every use.
        let rc = unsafe {
            espeak_SetParameter(ESPEAK_RATE, rate_wpm.clamp(80, 450) as c_int, 0);
            espeak_Synth(
                c.as_ptr().cast(),
                c.as_bytes_with_nul().len(),
                0,
                1, // POS_CHARACTER
                0,
                ESPEAK_CHARS_UTF8 as c_uint,
                std::ptr::null_mut(),
                (&mut samples as *mut Vec<i16>).cast(),
            )
        };
        if rc != EE_OK {
            return Err(EspeakError(format!("synthesis failed (code {rc})")));
        }
        Ok(samples)
    }
}

extern "C" fn synth_callback(wav: *mut c_short, n: c_int, events: *mut EspeakEvent) -> c_int {
    if wav.is_null() || n <= 0 || events.is_null() {
        return 0;
    }
    // SAFETY: espeak passes at least one event (list-terminated) whose user_data is the pointer
    // given to `espeak_Synth`: our `Vec<i16>`, alive for the whole call (see `synthesize`).
    unsafe {
        let user = (*events).user_data as *mut Vec<i16>;
        if let Some(out) = user.as_mut() {
            out.extend_from_slice(std::slice::from_raw_parts(wav, n as usize));
        }
    }
    0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn english_text_becomes_ipa_clauses() {
        let clauses = with(|e| {
            e.set_voice("en-us").unwrap();
            e.text_to_phonemes("Hello world, this is a test. Goodbye!")
                .unwrap()
        })
        .unwrap();
        assert_eq!(clauses.len(), 3, "{clauses:?}");
        assert!(clauses[0].phonemes.contains("həlˈoʊ"), "{clauses:?}");
        assert!(clauses[2].last);
        assert_eq!(
            clauses[2].consumed.end,
            "Hello world, this is a test. Goodbye!".len()
        );
    }

    #[test]
    fn unknown_voices_are_errors() {
        let r = with(|e| e.set_voice("xx-not-a-language")).unwrap();
        assert!(r.is_err());
        // The library keeps working afterwards.
        with(|e| e.set_voice("en-us")).unwrap().unwrap();
    }

    #[test]
    fn the_formant_voice_synthesizes_audio() {
        let (samples, rate) = with(|e| {
            e.set_voice("en-us").unwrap();
            (e.synthesize("Hello world.", 175).unwrap(), e.sample_rate())
        })
        .unwrap();
        assert_eq!(rate, 22050);
        let secs = samples.len() as f64 / rate as f64;
        assert!((0.3..3.0).contains(&secs), "{secs} s");
        assert!(crate::audio::rms(&samples) > 0.01);
    }
}
