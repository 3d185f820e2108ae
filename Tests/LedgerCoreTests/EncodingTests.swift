import LedgerCore
import Testing

@Suite("Hex and base64url")
struct EncodingTests {
    @Test("hex is lowercase, two digits a byte")
    func hex() {
        #expect(Hex.encode([0x00, 0x0f, 0xa0, 0xff]) == "000fa0ff")
        #expect(Hex.encode([]) == "")
    }

    @Test("base64url has no padding and round-trips every length", arguments: 0...7)
    func base64url(length: Int) {
        let bytes = (0..<length).map { UInt8(truncatingIfNeeded: 0xfb + $0 * 37) }
        let text = Base64URL.encode(bytes)
        #expect(!text.contains("=") && !text.contains("+") && !text.contains("/"))
        #expect(Base64URL.decode(text) == bytes)
    }

    @Test("known vectors of RFC 4648, in the url alphabet")
    func vectors() {
        #expect(Base64URL.encode(Array("foobar".utf8)) == "Zm9vYmFy")
        #expect(Base64URL.encode(Array("fo".utf8)) == "Zm8")
        #expect(Base64URL.encode([0xfb, 0xff]) == "-_8")
        #expect(Base64URL.decode("a+b") == nil)
    }
}
