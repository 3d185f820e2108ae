import Foundation
import LedgerCore
import Testing

@Suite("Retry-After: delta-seconds and HTTP-dates")
struct RetryAfterTests {
    // Sun, 06 Nov 1994 08:49:37 GMT, RFC 9110's example.
    let example = Date(timeIntervalSince1970: 784_111_777)

    @Test("delta-seconds", arguments: [("0", 0), ("1", 1_000), ("120", 120_000), (" 2 ", 2_000)])
    func deltaSeconds(value: String, expected: Int) {
        #expect(RetryAfter.delayMs(value) == expected)
    }

    @Test("a huge delta saturates instead of overflowing")
    func huge() {
        #expect(RetryAfter.delayMs("99999999999999999999999") == Int.max)
    }

    @Test("the three HTTP-date forms, measured from now", arguments: [
        "Sun, 06 Nov 1994 08:49:37 GMT", "Sunday, 06-Nov-94 08:49:37 GMT", "Sun Nov  6 08:49:37 1994",
    ])
    func httpDate(value: String) {
        #expect(RetryAfter.delayMs(value, now: example.addingTimeInterval(-5)) == 5_000)
    }

    @Test("a date in the past asks for no wait")
    func past() {
        #expect(RetryAfter.delayMs("Sun, 06 Nov 1994 08:49:37 GMT", now: example.addingTimeInterval(60)) == 0)
    }

    @Test("anything else is ignored", arguments: ["", "-1", "1.5", "soon", "Sun, 06 Nov 1994", "0x10"])
    func invalid(value: String) {
        #expect(RetryAfter.delayMs(value) == nil)
    }
}
